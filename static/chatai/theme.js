// Light, dark or the system's choice, remembered in this browser; runs before the page paints.
(function () {
  var root = document.documentElement;
  var saved = null;
  try { saved = localStorage.getItem("chatai-theme"); } catch (e) { /* storage off */ }
  if (saved === "light" || saved === "dark") root.setAttribute("data-theme", saved);
  document.addEventListener("DOMContentLoaded", function () {
    var button = document.getElementById("theme-toggle");
    if (!button) return;
    button.addEventListener("click", function () {
      var dark = root.getAttribute("data-theme") === "dark" ||
        (root.getAttribute("data-theme") === "auto" && matchMedia("(prefers-color-scheme: dark)").matches);
      var next = dark ? "light" : "dark";
      root.setAttribute("data-theme", next);
      try { localStorage.setItem("chatai-theme", next); } catch (e) { /* storage off */ }
    });
  });
})();
