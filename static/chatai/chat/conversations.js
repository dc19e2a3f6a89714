// Conversations as data: made, titled, sorted, turned into a request, imported. No DOM, no storage.

function uid() {
  return (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2));
}

export function newConversation(defaults, model) {
  return { id: uid(), title: "New chat", created: Date.now(), updated: Date.now(), model: model || "",
           system: defaults.system_prompt || "", temperature: defaults.temperature, top_p: defaults.top_p,
           max_tokens: defaults.max_tokens || null, messages: [] };
}

export function newestFirst(list) {
  return list.slice().sort(function (a, b) { return b.updated - a.updated; });
}

export function titleFrom(text) {
  return text.replace(/\s+/g, " ").slice(0, 60);
}

export function matches(conv, query) {
  return !query || conv.title.toLowerCase().indexOf(query) >= 0 ||
    conv.messages.some(function (m) { return String(m.content).toLowerCase().indexOf(query) >= 0; });
}

function isNumber(value) {
  return value !== null && value !== "" && !isNaN(value);
}

export function requestBody(conv) {
  var messages = [];
  if (conv.system && conv.system.trim()) messages.push({ role: "system", content: conv.system });
  conv.messages.forEach(function (m) {
    if (!m.error || m.content) messages.push({ role: m.role, content: m.content });
  });
  var body = { model: conv.model, messages: messages, stream: true };
  if (isNumber(conv.temperature)) body.temperature = Number(conv.temperature);
  if (isNumber(conv.top_p)) body.top_p = Number(conv.top_p);
  if (conv.max_tokens) body.max_tokens = Number(conv.max_tokens);
  return body;
}

export function exportFile(list) {
  return { format: "chatai-conversations", version: 1, exported: new Date().toISOString(), conversations: list };
}

function textOf(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map(function (p) { return p && typeof p.text === "string" ? p.text : ""; }).join("");
  }
  return content == null ? "" : String(content);
}

function fromMessages(messages, blank, extra) {
  var conv = blank();
  Object.assign(conv, extra || {});
  conv.messages = [];
  messages.forEach(function (m) {
    if (!m || typeof m !== "object") return;
    if (m.role === "system") { conv.system = textOf(m.content); return; }
    if (m.role !== "user" && m.role !== "assistant") return;
    conv.messages.push({ role: m.role, content: textOf(m.content) });
  });
  var first = conv.messages.find(function (m) { return m.role === "user"; });
  if (!extra || !extra.title) conv.title = first ? titleFrom(first.content) : "Imported chat";
  return conv;
}

// Accepts our export, a single conversation, a list of them, or a plain OpenAI messages array.
// ``blank()`` makes a new conversation with today's defaults; ``taken(id)`` says an id is in use.
export function parseImport(data, defaults, blank, taken) {
  if (Array.isArray(data) && data.length && data.every(function (m) { return m && typeof m.role === "string"; })) {
    return [fromMessages(data, blank)];
  }
  var list = Array.isArray(data) ? data : (data && Array.isArray(data.conversations)) ? data.conversations :
    (data && Array.isArray(data.messages)) ? [data] : null;
  if (!list) throw new Error("This file holds no conversations.");
  return list.filter(function (c) { return c && Array.isArray(c.messages); }).map(function (c) {
    var conv = fromMessages(c.messages, blank, {
      title: typeof c.title === "string" && c.title ? c.title.slice(0, 200) : "",
      model: typeof c.model === "string" ? c.model : undefined,
      temperature: typeof c.temperature === "number" ? c.temperature : defaults.temperature,
      top_p: typeof c.top_p === "number" ? c.top_p : defaults.top_p,
      max_tokens: typeof c.max_tokens === "number" ? c.max_tokens : null,
      created: typeof c.created === "number" ? c.created : Date.now()
    });
    if (!conv.title) conv.title = "Imported chat";
    if (typeof c.system === "string") conv.system = c.system;
    if (typeof c.id === "string" && !taken(c.id)) conv.id = c.id;
    if (!conv.model) conv.model = blank().model;
    return conv;
  });
}
