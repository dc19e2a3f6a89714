// The chat page. Conversations and settings live only in this browser (IndexedDB); the server
// sees each message only while it passes to the model. Talks to the same OpenAI-compatible
// /v1 API as any client, with the session cookie and the CSRF token.
// Modules: sse.js (reading the stream), store.js (IndexedDB), conversations.js (the data),
// view.js (drawing); this one holds the state and wires the page.
import { exportFile, matches, newConversation, newestFirst, parseImport, requestBody, titleFrom } from "./conversations.js";
import { readEvents } from "./sse.js";
import { openStore } from "./store.js";
import { conversationItem, download, editBox, errorItem, messageItem, missingModelOption, modelOption,
         progressText, renderText } from "./view.js";

var DEFAULTS = JSON.parse(document.getElementById("chat-defaults").textContent);
var CSRF = document.querySelector('meta[name="csrf-token"]').content;
var $ = function (id) { return document.getElementById(id); };
var ui = {
  list: $("conversations"), search: $("search"), messages: $("messages"), prompt: $("prompt"),
  composer: $("composer"), send: $("send"), stop: $("stop"), model: $("model"), status: $("model-status"),
  progress: $("progress"), settings: $("settings"), system: $("system-prompt"), temperature: $("temperature"),
  topP: $("top-p"), maxTokens: $("max-tokens"), reminder: $("export-reminder"), sidebar: $("sidebar")
};

// ---- state ------------------------------------------------------------------------------
var store = openStore(document.body.dataset.chatDb);
var conversations = [];
var current = null;
var models = [];
var streaming = null;  // {controller, conversation}
var messageActions = { edit: editMessage, regenerate: regenerate };
var listActions = { open: function (conv) { select(conv); closeSidebar(); }, rename: rename, remove: removeConversation };

function blank() {
  return newConversation(DEFAULTS, (current && current.model) || DEFAULTS.model || (models[0] && models[0].id));
}
function save(conv) {
  conv.updated = Date.now();
  return store.put(conv).catch(function (e) { showError("Could not save in this browser: " + e); });
}
function showError(text) { ui.messages.appendChild(errorItem(text)); }
function renderMessage(conv, index) { return messageItem(conv, index, messageActions); }

// ---- models -----------------------------------------------------------------------------
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
      renderModels();
      if (current && !current.model) current.model = ui.model.value;
    })
    .catch(function () { ui.status.textContent = "models unavailable"; });
}
function renderModels() {
  var selected = ui.model.value || (current && current.model);
  ui.model.replaceChildren();
  models.forEach(function (m) { ui.model.appendChild(modelOption(m)); });
  if (current && current.model && !models.some(function (m) { return m.id === current.model; })) {
    ui.model.appendChild(missingModelOption(current.model));
  }
  ui.model.value = (current && current.model) || selected || (models[0] && models[0].id) || "";
  showModelStatus();
}
// Live status over a WebSocket (/ws/status/): a model queues, starts and becomes ready on the page
// as it happens. Where no WebSocket gets through (a proxy without upgrade), the list is polled.
function liveStatus() {
  var ws, opened = false;
  try { ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/status/"); }
  catch (e) { poll(); return; }
  ws.onopen = function () { opened = true; document.body.dataset.live = "1"; };
  ws.onmessage = function (ev) {
    var msg = JSON.parse(ev.data);
    if (msg.type !== "status") return;
    var known = {};
    models.forEach(function (m) { known[m.id] = m; });
    if (msg.models.some(function (m) { return !known[m.id]; }) || msg.models.length !== models.length) {
      loadModels();  // a model came or went: names and descriptions come with the list
      return;
    }
    msg.models.forEach(function (m) {
      known[m.id].status = m.status; known[m.id].instances = m.instances; known[m.id].demand = m.demand;
    });
    renderModels();
  };
  ws.onclose = function (ev) {
    delete document.body.dataset.live;
    if (ev.code === 4401) { if (!streaming) location.reload(); return; }  // signed out or disabled
    if (!opened) { poll(); return; }
    setTimeout(liveStatus, 2000);  // the worker restarted: connect again
  };
}
function poll() { setInterval(loadModels, 15000); }
function showModelStatus() {
  var m = models.find(function (x) { return x.id === ui.model.value; });
  if (!m) { ui.status.textContent = ""; return; }
  ui.status.textContent = m.description || "";
  ui.status.dataset.status = m.status || "";
}

// ---- the page ---------------------------------------------------------------------------
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
  newestFirst(conversations).forEach(function (conv) {
    if (matches(conv, query)) ui.list.appendChild(conversationItem(conv, current && conv.id === current.id, listActions));
  });
}
function select(conv) {
  current = conv;
  store.set("current", conv.id);
  renderList();
  renderConversation();
  ui.prompt.focus();
}

// ---- conversations ----------------------------------------------------------------------
function startNew() {
  if (current && current.messages.length === 0) { ui.prompt.focus(); return; }
  var empty = conversations.find(function (c) { return c.messages.length === 0; });
  if (empty) { select(empty); return; }  // one empty chat is enough
  var conv = blank();
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
      if (conversations.length) select(newestFirst(conversations)[0]);
      else startNew();
    }
    renderList();
  });
}

// ---- talking to the model ---------------------------------------------------------------
function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.composer.setAttribute("aria-busy", busy ? "true" : "false");
}
function showProgress(text, started) {
  ui.progress.hidden = false;
  ui.progress.textContent = progressText(text, started);
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
    renderText(bodyEl, reply.content);
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }
  function onProgress(text) {
    lastProgress = text.replace(/\s*\(\d+s\)$/, "");
    showProgress(lastProgress, started);
    if (!ticker) ticker = setInterval(function () { if (lastProgress) showProgress(lastProgress, started); }, 1000);
  }
  function onData(data) {
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
        var spent = err && err.error && err.error.code === "insufficient_quota";  // waiting seconds will not help
        if (resp.status === 429 && spent) reply.error = "Not sent: " + reply.error;
        else if (resp.status === 429) reply.error += " Try again in " + (resp.headers.get("Retry-After") || "a few") + " s.";
      });
    }
    return readEvents(resp.body, { comment: onProgress, data: onData });
  }).catch(function (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = "The connection was lost: " + e.message;
  }).then(function () {
    clearInterval(ticker);
    hideProgress();
    streaming = null;
    setBusy(false);
    if (!reply.content && !reply.error && !reply.stopped) reply.error = "The model sent an empty reply.";
    li.replaceWith(renderMessage(conv, index));
    return save(conv);
  }).then(renderList);
}
function sendText(text) {
  if (!current) startNew();
  var conv = current;
  conv.model = ui.model.value || conv.model;
  if (!conv.model) { showError("No model is available."); return; }
  if (conv.messages.length === 0 && conv.title === "New chat") conv.title = titleFrom(text);
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
  var edit = editBox(conv.messages[index].content, function (text) {
    if (!text) return;
    conv.messages = conv.messages.slice(0, index);
    conv.messages.push({ role: "user", content: text });
    renderConversation();
    complete(conv);
  }, renderConversation);
  li.querySelector(".body").replaceWith(edit.box);
  edit.area.focus();
}

// ---- export, import, clear --------------------------------------------------------------
function exportConversations(list, name) {
  download(name, exportFile(list));
  store.set("lastExport", Date.now()).then(showReminder);
}
function importFile(file) {
  file.text().then(function (text) {
    var taken = function (id) { return conversations.some(function (x) { return x.id === id; }); };
    var list = parseImport(JSON.parse(text), DEFAULTS, blank, taken);
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

// ---- wiring -----------------------------------------------------------------------------
function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  $("sidebar-toggle").setAttribute("aria-expanded", "false");
}
function numberOrNull(input) {
  return input.value === "" ? null : Number(input.value);
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
    current.temperature = numberOrNull(ui.temperature);
    current.top_p = numberOrNull(ui.topP);
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
  store.ready.then(function () {
    return Promise.all([store.all(), store.get("current"), loadModels()]);
  }).then(function (r) {
    conversations = r[0] || [];
    var last = conversations.find(function (c) { return c.id === r[1]; }) || newestFirst(conversations)[0];
    if (last) select(last); else startNew();
    showReminder();
    liveStatus();
    document.body.dataset.ready = "1";
  }).catch(function (e) {
    showError("This browser does not allow storing conversations (IndexedDB): " + e +
              ". Private windows of some browsers block it.");
  });
}
start();
