// The page's pieces, drawn: messages, the conversation list, the model list, the cold-start line.
// Markdown, maths and code in replies go through ChatRender (render.js, sanitised).

export var STATUS_TEXT = { ready: "ready", starting: "starting", queued: "queued", offline: "offline, starts on use",
                           failed: "failed to start" };

function element(tag, className, text) {
  var el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

export function button(label, title, onClick) {
  var b = element("button", "small", label);
  b.type = "button";
  b.title = title;
  b.setAttribute("aria-label", title);
  b.addEventListener("click", onClick);
  return b;
}

export function errorItem(text) {
  return element("li", "msg error", text);
}

export function renderText(el, content) {
  window.ChatRender.render(el, content);
}

// One message; ``on.edit(conv, index, li)`` and ``on.regenerate(conv)`` are its buttons' actions.
export function messageItem(conv, index, on) {
  var msg = conv.messages[index];
  var li = element("li", "msg " + msg.role);
  li.dataset.index = index;
  var body = element("div", "body");
  if (msg.role === "assistant") renderText(body, msg.content);
  else body.textContent = msg.content;
  li.appendChild(element("div", "who", msg.role === "user" ? "You" : (msg.model || "Assistant")));
  li.appendChild(body);
  if (msg.error) {
    var err = element("p", "error", msg.error);
    err.setAttribute("role", "alert");
    li.appendChild(err);
  }
  if (msg.stopped) li.appendChild(element("p", "muted", "(stopped)"));
  var tools = element("div", "tools");
  tools.appendChild(button("Copy", "Copy message", function () { navigator.clipboard.writeText(msg.content); }));
  if (msg.role === "user") tools.appendChild(button("Edit", "Edit and resend", function () { on.edit(conv, index, li); }));
  if (msg.role === "assistant" && index === conv.messages.length - 1) {
    tools.appendChild(button("Regenerate", "Regenerate the reply", function () { on.regenerate(conv); }));
  }
  li.appendChild(tools);
  return li;
}

// One entry of the conversation list; ``on.open``, ``on.rename``, ``on.remove`` take the conversation.
export function conversationItem(conv, active, on) {
  var li = document.createElement("li");
  if (active) li.className = "active";
  var open = element("button", "open", conv.title || "Untitled");
  open.type = "button";
  if (active) open.setAttribute("aria-current", "true");
  open.addEventListener("click", function () { on.open(conv); });
  li.appendChild(open);
  li.appendChild(button("✎", "Rename " + conv.title, function () { on.rename(conv); }));
  li.appendChild(button("✕", "Delete " + conv.title, function () { on.remove(conv); }));
  return li;
}

export function modelOption(m) {
  var option = document.createElement("option");
  option.value = m.id;
  option.textContent = (m.name || m.id) + " (" + (STATUS_TEXT[m.status] || m.status || "?") +
    (m.demand ? ", " + m.demand + " waiting" : "") + ")";
  return option;
}

export function missingModelOption(id) {
  var option = document.createElement("option");
  option.value = id;
  option.textContent = id + " (not available)";
  return option;
}

export function editBox(text, onSave, onCancel) {
  var area = document.createElement("textarea");
  area.value = text;
  area.rows = Math.min(12, Math.max(2, area.value.split("\n").length));
  area.setAttribute("aria-label", "Edit message");
  var box = element("div", "edit");
  box.append(area, button("Save and send", "Save and send", function () { onSave(area.value.trim()); }),
             button("Cancel", "Cancel editing", onCancel));
  return { box: box, area: area };
}

export function progressText(text, started) {
  return "Starting the model: " + text + " (" + Math.round((Date.now() - started) / 1000) + " s)";
}

export function download(name, data) {
  var blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  var a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.appendChild(a);
  a.click();
  setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}
