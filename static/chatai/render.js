// Rendering model output safely: markdown (marked), code highlighting (highlight.js) and LaTeX
// (KaTeX), with nothing the model writes able to run script or load a remote resource.
//
// - Raw HTML in the model's markdown is shown as text, never parsed.
// - Images are shown as links (their address is not fetched).
// - Links keep only http(s) and mailto addresses and open in a new tab without a referrer.
// - DOMPurify cleans the HTML marked produced; KaTeX runs with trust off afterwards on the
//   elements that hold the formulas' source as text.
// - The page's Content-Security-Policy is the last line: no inline script, no third-party origin.
(function () {
  "use strict";

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  var SAFE_URL = /^(https?:|mailto:)/i;

  var mathBlock = {
    name: "mathBlock",
    level: "block",
    start: function (src) { var m = src.match(/\$\$|\\\[/); return m ? m.index : undefined; },
    tokenizer: function (src) {
      var m = /^(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])/.exec(src);
      if (m) return { type: "mathBlock", raw: m[0], text: (m[1] || m[2]).trim() };
    },
    renderer: function (token) {
      return '<div class="math" data-display="1">' + escapeHtml(token.text) + "</div>";
    }
  };
  var mathInline = {
    name: "mathInline",
    level: "inline",
    start: function (src) { var m = src.match(/\$|\\\(/); return m ? m.index : undefined; },
    tokenizer: function (src) {
      var m = /^\\\(([\s\S]+?)\\\)/.exec(src) || /^\$(?![\s$])((?:\\\$|[^$\n])+?)(?<![\s\\])\$(?!\d)/.exec(src);
      if (m) return { type: "mathInline", raw: m[0], text: m[1] };
    },
    renderer: function (token) {
      return '<span class="math">' + escapeHtml(token.text) + "</span>";
    }
  };

  var configured = false;
  function configure() {
    if (configured) return;
    configured = true;
    window.marked.use({
      gfm: true,
      breaks: false,
      extensions: [mathBlock, mathInline],
      renderer: {
        html: function (token) { return escapeHtml(token.text); },  // raw HTML stays text
        image: function (token) {
          var label = escapeHtml(token.text || token.href || "image");
          return SAFE_URL.test(token.href || "") ?
            '<a href="' + escapeHtml(token.href) + '">[image: ' + label + "]</a>" : "[image: " + label + "]";
        }
      }
    });
    window.DOMPurify.addHook("afterSanitizeAttributes", function (node) {
      if (node.tagName === "A") {
        var href = node.getAttribute("href") || "";
        if (!SAFE_URL.test(href)) node.removeAttribute("href");
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
  }

  var PURIFY = {
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "object",
                  "embed", "video", "audio", "source", "picture", "svg", "math", "link", "meta", "base"],
    FORBID_ATTR: ["style", "srcset", "formaction", "xlink:href", "action"],
    ALLOW_DATA_ATTR: false,
    ADD_ATTR: ["data-display", "target"]
  };

  function addCopyButton(pre) {
    var button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy code");
    button.addEventListener("click", function () {
      var code = pre.querySelector("code");
      navigator.clipboard.writeText(code ? code.textContent : pre.textContent).then(function () {
        button.textContent = "Copied";
        setTimeout(function () { button.textContent = "Copy"; }, 1500);
      });
    });
    pre.appendChild(button);
  }

  // Render markdown text into element (replacing its content).
  function render(element, text) {
    if (!window.marked || !window.DOMPurify) {  // libraries not loaded: plain text, still safe
      element.textContent = text;
      return;
    }
    configure();
    var html = window.DOMPurify.sanitize(window.marked.parse(String(text)), PURIFY);
    var holder = document.createElement("div");
    holder.innerHTML = html;  // sanitized above; nothing here can run or fetch
    holder.querySelectorAll(".math").forEach(function (node) {
      var tex = node.textContent;
      if (!window.katex) return;
      try {
        window.katex.render(tex, node, { displayMode: node.getAttribute("data-display") === "1",
          throwOnError: false, trust: false, strict: "ignore", maxExpand: 1000, maxSize: 50 });
      } catch (e) {
        node.textContent = tex;
      }
    });
    holder.querySelectorAll("pre code").forEach(function (code) {
      if (window.hljs) {
        code.className = code.className.replace(/[^\w\- ]/g, "");
        window.hljs.highlightElement(code);
      }
      addCopyButton(code.parentElement);
    });
    element.replaceChildren.apply(element, Array.prototype.slice.call(holder.childNodes));
  }

  if (window.hljs) window.hljs.configure({ ignoreUnescapedHTML: true });

  // Code colours follow the page's theme (the toggle as well as the system setting).
  function syncHighlightTheme() {
    var theme = document.documentElement.getAttribute("data-theme");
    var light = document.getElementById("hl-light"), dark = document.getElementById("hl-dark");
    if (!light || !dark) return;
    if (theme === "light" || theme === "dark") {
      light.media = theme === "light" ? "all" : "not all";
      dark.media = theme === "dark" ? "all" : "not all";
    }
  }
  new MutationObserver(syncHighlightTheme).observe(document.documentElement, { attributes: true,
    attributeFilter: ["data-theme"] });
  syncHighlightTheme();

  window.ChatRender = { render: render, escapeHtml: escapeHtml };
})();
