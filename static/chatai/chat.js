// The chat page. Conversations and settings live only in this browser (IndexedDB); the server
// sees each message only while it passes to the model. Talks to the same OpenAI-compatible
// /v1 API as any client, with the session cookie and the CSRF token.
(function () {
  "use strict";

  var DEFAULTS = JSON.parse(document.getElementById("chat-defaults").textContent);
  var CSRF = document.querySelector('meta[name="csrf-token"]').content;
  var $ = function (id) { return document.getElementById(id); };
  var ui = {
    list: $("conversations"), search: $("search"), messages: $("messages"), prompt: $("prompt"),
    composer: $("composer"), send: $("send"), stop: $("stop"), model: $("model"), status: $("model-status"),
    progress: $("progress"), settings: $("settings"), system: $("system-prompt"), temperature: $("temperature"),
    topP: $("top-p"), maxTokens: $("max-tokens"), reminder: $("export-reminder"), sidebar: $("sidebar")
  };

  // ---- storage (IndexedDB) ------------------------------------------------------------
  // One database per user of this browser, named after the user id (not the name, which SSO
  // may reuse): another account signed in here later never sees these conversations.
  var DB_NAME = document.body.dataset.chatDb;
  var db = null;
  function openDb() {
    return new Promise(function (resolve, reject) {
      if (!DB_NAME) { reject(new Error("no user")); return; }
      var req = indexedDB.open(DB_NAME, 1);
      req.onupgradeneeded = function () {
        var d = req.result;
        if (!d.objectStoreNames.contains("conversations")) d.createObjectStore("conversations", { keyPath: "id" });
        if (!d.objectStoreNames.contains("settings")) d.createObjectStore("settings");
      };
      req.onsuccess = function () {
        // "Forget my chats" (sign-out, any tab) deletes the database: let go of it when asked.
        req.result.onversionchange = function () { req.result.close(); };
        resolve(req.result);
      };
      req.onerror = function () { reject(req.error); };
    });
  }
  function tx(store, mode, fn) {
    return new Promise(function (resolve, reject) {
      var t = db.transaction(store, mode), result;
      var s = t.objectStore(store);
      var req = fn(s);
      if (req) req.onsuccess = function () { result = req.result; };
      t.oncomplete = function () { resolve(result); };
      t.onerror = function () { reject(t.error); };
      t.onabort = function () { reject(t.error); };
    });
  }
  var store = {
    all: function () { return tx("conversations", "readonly", function (s) { return s.getAll(); }); },
    put: function (c) { return tx("conversations", "readwrite", function (s) { return s.put(c); }); },
    remove: function (id) { return tx("conversations", "readwrite", function (s) { return s.delete(id); }); },
    get: function (k) { return tx("settings", "readonly", function (s) { return s.get(k); }); },
    set: function (k, v) { return tx("settings", "readwrite", function (s) { return s.put(v, k); }); },
    clear: function () {
      return Promise.all([tx("conversations", "readwrite", function (s) { return s.clear(); }),
                          tx("settings", "readwrite", function (s) { return s.clear(); })]);
    }
  };

  // ---- state ----------------------------------------------------------------------------
  var conversations = [];
  var current = null;
  var models = [];
  var streaming = null;  // {controller, conversation}

  function uid() {
    return (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2));
  }
  function newConversation() {
    return { id: uid(), title: "New chat", created: Date.now(), updated: Date.now(),
             model: (current && current.model) || DEFAULTS.model || (models[0] && models[0].id) || "",
             system: DEFAULTS.system_prompt || "", temperature: DEFAULTS.temperature, top_p: DEFAULTS.top_p,
             max_tokens: DEFAULTS.max_tokens || null, messages: [] };
  }
  function save(conv) {
    conv.updated = Date.now();
    return store.put(conv).catch(function (e) { showError("Could not save in this browser: " + e); });
  }

  // ---- models ---------------------------------------------------------------------------
  var STATUS_TEXT = { ready: "ready", starting: "starting", queued: "queued", offline: "offline, starts on use",
                      failed: "failed to start" };
  function loadModels() {
    return fetch("/v1/models", { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        // Signed out, or the sign-in's periodic check with the provider is due: a page load renews
        // it (silently while the provider's session lives). Never in the middle of a reply.
        if ((r.status === 401 || r.status === 403) && !streaming) location.reload();
        return r.json();
      })
      .then(function (body) {
        models = (body && body.data) || [];
        var selected = ui.model.value || (current && current.model);
        ui.model.replaceChildren();
        models.forEach(function (m) {
          var option = document.createElement("option");
          option.value = m.id;
          option.textContent = (m.name || m.id) + " (" + (STATUS_TEXT[m.status] || m.status || "?") +
            (m.demand ? ", " + m.demand + " waiting" : "") + ")";
          ui.model.appendChild(option);
        });
        if (current && current.model && !models.some(function (m) { return m.id === current.model; })) {
          var missing = document.createElement("option");
          missing.value = current.model;
          missing.textContent = current.model + " (not available)";
          ui.model.appendChild(missing);
        }
        ui.model.value = (current && current.model) || selected || (models[0] && models[0].id) || "";
        if (current && !current.model) current.model = ui.model.value;
        showModelStatus();
      })
      .catch(function () { ui.status.textContent = "models unavailable"; });
  }
  function showModelStatus() {
    var m = models.find(function (x) { return x.id === ui.model.value; });
    if (!m) { ui.status.textContent = ""; return; }
    ui.status.textContent = m.description || "";
    ui.status.dataset.status = m.status || "";
  }

  // ---- rendering ------------------------------------------------------------------------
  function showError(text) {
    var li = document.createElement("li");
    li.className = "msg error";
    li.textContent = text;
    ui.messages.appendChild(li);
  }
  function button(label, title, onClick) {
    var b = document.createElement("button");
    b.type = "button";
    b.className = "small";
    b.textContent = label;
    b.title = title;
    b.setAttribute("aria-label", title);
    b.addEventListener("click", onClick);
    return b;
  }
  function renderMessage(conv, index) {
    var msg = conv.messages[index];
    var li = document.createElement("li");
    li.className = "msg " + msg.role;
    li.dataset.index = index;
    var who = document.createElement("div");
    who.className = "who";
    who.textContent = msg.role === "user" ? "You" : (msg.model || "Assistant");
    var body = document.createElement("div");
    body.className = "body";
    if (msg.role === "assistant") window.ChatRender.render(body, msg.content);
    else body.textContent = msg.content;
    li.appendChild(who);
    li.appendChild(body);
    if (msg.error) {
      var err = document.createElement("p");
      err.className = "error";
      err.setAttribute("role", "alert");
      err.textContent = msg.error;
      li.appendChild(err);
    }
    if (msg.stopped) {
      var note = document.createElement("p");
      note.className = "muted";
      note.textContent = "(stopped)";
      li.appendChild(note);
    }
    var tools = document.createElement("div");
    tools.className = "tools";
    tools.appendChild(button("Copy", "Copy message", function () { navigator.clipboard.writeText(msg.content); }));
    if (msg.role === "user") tools.appendChild(button("Edit", "Edit and resend", function () { editMessage(conv, index, li); }));
    if (msg.role === "assistant" && index === conv.messages.length - 1) {
      tools.appendChild(button("Regenerate", "Regenerate the reply", function () { regenerate(conv); }));
    }
    li.appendChild(tools);
    return li;
  }
  function renderConversation() {
    ui.messages.replaceChildren();
    if (!current) return;
    current.messages.forEach(function (_, i) { ui.messages.appendChild(renderMessage(current, i)); });
    ui.system.value = current.system || "";
    ui.temperature.value = current.temperature == null ? "" : current.temperature;
    ui.topP.value = current.top_p == null ? "" : current.top_p;
    ui.maxTokens.value = current.max_tokens == null ? "" : current.max_tokens;
    if (current.model) ui.model.value = current.model;
    showModelStatus();
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }
  function renderList() {
    var query = ui.search.value.trim().toLowerCase();
    ui.list.replaceChildren();
    conversations.slice().sort(function (a, b) { return b.updated - a.updated; }).forEach(function (conv) {
      if (query && conv.title.toLowerCase().indexOf(query) < 0 &&
          !conv.messages.some(function (m) { return String(m.content).toLowerCase().indexOf(query) >= 0; })) return;
      var li = document.createElement("li");
      if (current && conv.id === current.id) li.className = "active";
      var open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.textContent = conv.title || "Untitled";
      if (current && conv.id === current.id) open.setAttribute("aria-current", "true");
      open.addEventListener("click", function () { select(conv); closeSidebar(); });
      li.appendChild(open);
      li.appendChild(button("✎", "Rename " + conv.title, function () { rename(conv); }));
      li.appendChild(button("✕", "Delete " + conv.title, function () { removeConversation(conv); }));
      ui.list.appendChild(li);
    });
  }
  function select(conv) {
    current = conv;
    store.set("current", conv.id);
    renderList();
    renderConversation();
    ui.prompt.focus();
  }

  // ---- conversations --------------------------------------------------------------------
  function startNew() {
    if (current && current.messages.length === 0) { ui.prompt.focus(); return; }
    var empty = conversations.find(function (c) { return c.messages.length === 0; });
    if (empty) { select(empty); return; }  // one empty chat is enough
    var conv = newConversation();
    conversations.push(conv);
    save(conv);
    select(conv);
  }
  function rename(conv) {
    var title = window.prompt("Rename the conversation", conv.title);
    if (title === null) return;
    conv.title = title.trim().slice(0, 200) || conv.title;
    save(conv).then(renderList);
  }
  function removeConversation(conv) {
    if (!window.confirm("Delete “" + conv.title + "”? It cannot be restored.")) return;
    conversations = conversations.filter(function (c) { return c.id !== conv.id; });
    store.remove(conv.id).then(function () {
      if (current && current.id === conv.id) {
        current = null;
        if (conversations.length) select(conversations.slice().sort(function (a, b) { return b.updated - a.updated; })[0]);
        else startNew();
      }
      renderList();
    });
  }

  // ---- talking to the model -------------------------------------------------------------
  function requestBody(conv) {
    var messages = [];
    if (conv.system && conv.system.trim()) messages.push({ role: "system", content: conv.system });
    conv.messages.forEach(function (m) {
      if (!m.error || m.content) messages.push({ role: m.role, content: m.content });
    });
    var body = { model: conv.model, messages: messages, stream: true };
    if (conv.temperature !== null && conv.temperature !== "" && !isNaN(conv.temperature)) body.temperature = Number(conv.temperature);
    if (conv.top_p !== null && conv.top_p !== "" && !isNaN(conv.top_p)) body.top_p = Number(conv.top_p);
    if (conv.max_tokens) body.max_tokens = Number(conv.max_tokens);
    return body;
  }
  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.composer.setAttribute("aria-busy", busy ? "true" : "false");
  }
  function showProgress(text, started) {
    ui.progress.hidden = false;
    var seconds = Math.round((Date.now() - started) / 1000);
    ui.progress.textContent = "Starting the model: " + text + " (" + seconds + " s)";
  }
  function hideProgress() { ui.progress.hidden = true; ui.progress.textContent = ""; }

  function complete(conv) {
    var reply = { role: "assistant", content: "", model: conv.model };
    var body = requestBody(conv);
    conv.messages.push(reply);
    var index = conv.messages.length - 1;
    var li = renderMessage(conv, index);
    li.querySelector(".tools").hidden = true;  // until the reply is complete
    ui.messages.appendChild(li);
    var bodyEl = li.querySelector(".body");
    var controller = new AbortController();
    streaming = { controller: controller, conversation: conv };
    setBusy(true);
    var started = Date.now(), lastProgress = null, ticker = null, pending = false;
    function paint() {
      pending = false;
      window.ChatRender.render(bodyEl, reply.content);
      ui.messages.scrollTop = ui.messages.scrollHeight;
    }
    function onProgress(text) {
      lastProgress = text.replace(/\s*\(\d+s\)$/, "");
      showProgress(lastProgress, started);
      if (!ticker) ticker = setInterval(function () { if (lastProgress) showProgress(lastProgress, started); }, 1000);
    }
    function onEvent(data) {
      if (data === "[DONE]") return;
      var obj;
      try { obj = JSON.parse(data); } catch (e) { return; }
      if (obj.error) { reply.error = obj.error.message || "The model failed."; return; }
      var delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
      if (delta && delta.content) {
        if (lastProgress !== null) { lastProgress = null; hideProgress(); }
        reply.content += delta.content;
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      }
    }
    return fetch("/v1/chat/completions", {
      method: "POST", credentials: "same-origin", signal: controller.signal,
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream", "X-CSRFToken": CSRF },
      body: JSON.stringify(body)
    }).then(function (resp) {
      if (!resp.ok) {
        return resp.json().catch(function () { return null; }).then(function (err) {
          reply.error = (err && err.error && err.error.message) || ("The request failed (HTTP " + resp.status + ").");
          if (resp.status === 401) reply.error = "Your sign-in has ended: reload the page to sign in again.";
          if (resp.status === 429) reply.error += " Try again in " + (resp.headers.get("Retry-After") || "a few") + " s.";
        });
      }
      var reader = resp.body.getReader(), decoder = new TextDecoder(), buffer = "";
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) return;
          buffer += decoder.decode(chunk.value, { stream: true });
          var cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            var block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            block.split("\n").forEach(function (line) {
              if (line.indexOf(": ") === 0) onProgress(line.slice(2));
              else if (line.indexOf("data: ") === 0) onEvent(line.slice(6));
            });
          }
          return pump();
        });
      }
      return pump();
    }).catch(function (e) {
      if (e.name === "AbortError") reply.stopped = true;
      else reply.error = "The connection was lost: " + e.message;
    }).then(function () {
      clearInterval(ticker);
      hideProgress();
      streaming = null;
      setBusy(false);
      if (!reply.content && !reply.error && !reply.stopped) reply.error = "The model sent an empty reply.";
      if (reply.content) loadModels();  // its status has changed (it runs now)
      li.replaceWith(renderMessage(conv, index));
      return save(conv);
    }).then(renderList);
  }
  function sendText(text) {
    if (!current) startNew();
    var conv = current;
    conv.model = ui.model.value || conv.model;
    if (!conv.model) { showError("No model is available."); return; }
    if (conv.messages.length === 0 && conv.title === "New chat") conv.title = text.replace(/\s+/g, " ").slice(0, 60);
    conv.messages.push({ role: "user", content: text });
    ui.messages.appendChild(renderMessage(conv, conv.messages.length - 1));
    var last = conv.messages.length - 2;
    if (last >= 0) {  // the previous reply loses its Regenerate button
      var prev = ui.messages.querySelector('li[data-index="' + last + '"]');
      if (prev) prev.replaceWith(renderMessage(conv, last));
    }
    save(conv).then(renderList);
    complete(conv);
  }
  function regenerate(conv) {
    if (streaming) return;
    while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
    renderConversation();
    complete(conv);
  }
  function editMessage(conv, index, li) {
    if (streaming) return;
    var area = document.createElement("textarea");
    area.value = conv.messages[index].content;
    area.rows = Math.min(12, Math.max(2, area.value.split("\n").length));
    area.setAttribute("aria-label", "Edit message");
    var ok = button("Save and send", "Save and send", function () {
      var text = area.value.trim();
      if (!text) return;
      conv.messages = conv.messages.slice(0, index);
      conv.messages.push({ role: "user", content: text });
      renderConversation();
      complete(conv);
    });
    var cancel = button("Cancel", "Cancel editing", renderConversation);
    var box = document.createElement("div");
    box.className = "edit";
    box.append(area, ok, cancel);
    li.querySelector(".body").replaceWith(box);
    area.focus();
  }

  // ---- export, import, clear ------------------------------------------------------------
  function download(name, data) {
    var blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }
  function exportConversations(list, name) {
    download(name, { format: "chatai-conversations", version: 1, exported: new Date().toISOString(),
                     conversations: list });
    store.set("lastExport", Date.now()).then(showReminder);
  }
  function textOf(content) {
    if (typeof content === "string") return content;
    if (Array.isArray(content)) {
      return content.map(function (p) { return p && typeof p.text === "string" ? p.text : ""; }).join("");
    }
    return content == null ? "" : String(content);
  }
  function fromMessages(messages, extra) {
    var conv = newConversation();
    Object.assign(conv, extra || {});
    conv.messages = [];
    messages.forEach(function (m) {
      if (!m || typeof m !== "object") return;
      if (m.role === "system") { conv.system = textOf(m.content); return; }
      if (m.role !== "user" && m.role !== "assistant") return;
      conv.messages.push({ role: m.role, content: textOf(m.content) });
    });
    var first = conv.messages.find(function (m) { return m.role === "user"; });
    if (!extra || !extra.title) conv.title = first ? first.content.replace(/\s+/g, " ").slice(0, 60) : "Imported chat";
    return conv;
  }
  // Accepts our export, a single conversation, a list of them, or a plain OpenAI messages array.
  function parseImport(data) {
    if (Array.isArray(data) && data.length && data.every(function (m) { return m && typeof m.role === "string"; })) {
      return [fromMessages(data)];
    }
    var list = Array.isArray(data) ? data : (data && Array.isArray(data.conversations)) ? data.conversations :
      (data && Array.isArray(data.messages)) ? [data] : null;
    if (!list) throw new Error("This file holds no conversations.");
    return list.filter(function (c) { return c && Array.isArray(c.messages); }).map(function (c) {
      var conv = fromMessages(c.messages, {
        title: typeof c.title === "string" && c.title ? c.title.slice(0, 200) : "",
        model: typeof c.model === "string" ? c.model : undefined,
        temperature: typeof c.temperature === "number" ? c.temperature : DEFAULTS.temperature,
        top_p: typeof c.top_p === "number" ? c.top_p : DEFAULTS.top_p,
        max_tokens: typeof c.max_tokens === "number" ? c.max_tokens : null,
        created: typeof c.created === "number" ? c.created : Date.now()
      });
      if (!conv.title) conv.title = "Imported chat";
      if (typeof c.system === "string") conv.system = c.system;
      if (typeof c.id === "string" && !conversations.some(function (x) { return x.id === c.id; })) conv.id = c.id;
      if (!conv.model) conv.model = newConversation().model;
      return conv;
    });
  }
  function importFile(file) {
    file.text().then(function (text) {
      var list = parseImport(JSON.parse(text));
      if (!list.length) throw new Error("This file holds no conversations.");
      return Promise.all(list.map(function (c) { conversations.push(c); return store.put(c); })).then(function () {
        select(list[0]);
        announce("Imported " + list.length + " conversation" + (list.length > 1 ? "s" : "") + ".");
      });
    }).catch(function (e) { window.alert("Import failed: " + e.message); });
  }
  function clearAll() {
    if (!window.confirm("Delete all your conversations and settings from this browser? This cannot be undone.")) return;
    if (streaming) streaming.controller.abort();
    store.clear().then(function () {
      conversations = [];
      current = null;
      startNew();
      showReminder();
      announce("All data in this browser is deleted.");
    });
  }
  function showReminder() {
    store.get("lastExport").then(function (when) {
      ui.reminder.textContent = "Your chats are stored only in this browser; the server keeps nothing. " +
        (when ? "Last export: " + new Date(when).toLocaleString() + "." : "Export them to keep a copy.");
    });
  }
  function announce(text) {
    ui.status.textContent = text;
  }

  // ---- wiring ---------------------------------------------------------------------------
  function closeSidebar() {
    document.body.classList.remove("sidebar-open");
    $("sidebar-toggle").setAttribute("aria-expanded", "false");
  }
  function bind() {
    ui.composer.addEventListener("submit", function (e) {
      e.preventDefault();
      var text = ui.prompt.value.trim();
      if (!text || streaming) return;
      ui.prompt.value = "";
      sendText(text);
    });
    ui.prompt.addEventListener("keydown", function (e) {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); ui.composer.requestSubmit(); }
    });
    ui.stop.addEventListener("click", function () { if (streaming) streaming.controller.abort(); });
    $("new-chat").addEventListener("click", startNew);
    ui.search.addEventListener("input", renderList);
    ui.model.addEventListener("change", function () {
      if (current) { current.model = ui.model.value; save(current); }
      showModelStatus();
    });
    $("settings-toggle").addEventListener("click", function () {
      ui.settings.hidden = !ui.settings.hidden;
      this.setAttribute("aria-expanded", String(!ui.settings.hidden));
    });
    ui.settings.addEventListener("input", function () {
      if (!current) return;
      current.system = ui.system.value;
      current.temperature = ui.temperature.value === "" ? null : Number(ui.temperature.value);
      current.top_p = ui.topP.value === "" ? null : Number(ui.topP.value);
      current.max_tokens = ui.maxTokens.value === "" ? null : Math.max(1, parseInt(ui.maxTokens.value, 10) || 1);
      save(current);
    });
    ui.settings.addEventListener("submit", function (e) { e.preventDefault(); });
    $("export-one").addEventListener("click", function () {
      if (current) exportConversations([current], "chat-" + current.title.replace(/[^\w-]+/g, "_").slice(0, 40) + ".json");
    });
    $("export-all").addEventListener("click", function () {
      exportConversations(conversations, "chats-" + new Date().toISOString().slice(0, 10) + ".json");
    });
    $("import-file").addEventListener("change", function () {
      if (this.files[0]) importFile(this.files[0]);
      this.value = "";
    });
    $("clear-all").addEventListener("click", clearAll);
    document.querySelector(".chat").addEventListener("click", function () {
      if (document.body.classList.contains("sidebar-open")) closeSidebar();
    });
    $("sidebar-toggle").addEventListener("click", function (e) {
      e.stopPropagation();
      var open = document.body.classList.toggle("sidebar-open");
      this.setAttribute("aria-expanded", String(open));
    });
    document.addEventListener("keydown", function (e) {
      if ((e.ctrlKey || e.metaKey) && e.shiftKey && (e.key === "O" || e.key === "o")) { e.preventDefault(); startNew(); }
      else if (e.key === "Escape" && streaming) streaming.controller.abort();
      else if (e.key === "Escape") closeSidebar();
    });
  }

  function start() {
    bind();
    openDb().then(function (d) {
      db = d;
      return Promise.all([store.all(), store.get("current"), loadModels()]);
    }).then(function (r) {
      conversations = r[0] || [];
      var last = conversations.find(function (c) { return c.id === r[1]; }) ||
        conversations.slice().sort(function (a, b) { return b.updated - a.updated; })[0];
      if (last) select(last); else startNew();
      showReminder();
      setInterval(loadModels, 15000);
      document.body.dataset.ready = "1";
    }).catch(function (e) {
      showError("This browser does not allow storing conversations (IndexedDB): " + e +
                ". Private windows of some browsers block it.");
    });
  }
  start();
})();
