// The chat page: conversations kept in this browser's localStorage, answers streamed from the
// server's /v1/chat/completions (server-sent events read from fetch's body), settings sent with
// each request. Text from the model or from an imported file is only ever set as text.

import { describe, errorBody, events } from "./api.js";
import { el, renderMarkdown } from "./markdown.js";
import { exportFile, load, newId, parseImport } from "./storage.js";

const STORE_KEY = "llama2-chat";
const SETTINGS_KEY = "llama2-chat-settings";
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "api_key"];
const $ = (id) => document.getElementById(id);
const EMPTY = $("empty"); // the hint an empty conversation shows

let store = load(STORE_KEY, {});
if (!Array.isArray(store.conversations)) store = { conversations: [], current: null };
let settings = load(SETTINGS_KEY, {});
let server = null; // what GET /props said: {model, max_model_len, defaults}
let running = null; // the answer being streamed: {conversation, message, controller}

function save() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(store));
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
  } catch (e) {
    notify(`Could not save in this browser's storage: ${e.message}`);
  }
}

function button(text, onClick, className = "") {
  const node = el("button", className, text);
  node.type = "button";
  node.addEventListener("click", onClick);
  return node;
}

function current() {
  return store.conversations.find((c) => c.id === store.current) || null;
}

// A line above the input box; `about` names what it is about, for whoever may clear it.
function notify(text, kind = "error", about = "") {
  $("notice-text").textContent = text;
  $("notice").className = kind;
  $("notice").dataset.about = about;
  $("notice").hidden = false;
}

// ---- conversations ----

function newConversation() {
  const conversation = { id: newId(), title: "New chat", created: Date.now(), messages: [] };
  store.conversations.unshift(conversation);
  store.current = conversation.id;
  return conversation;
}

function switchTo(id) {
  store.current = id;
  document.body.classList.remove("sidebar-open");
  save();
  render();
}

function remove(conversation) {
  if (!confirm(`Delete "${conversation.title}"?`)) return;
  if (running && running.conversation === conversation) running.controller.abort();
  store.conversations = store.conversations.filter((c) => c !== conversation);
  if (store.current === conversation.id) store.current = store.conversations[0]?.id ?? null;
  save();
  render();
}

function startRename(conversation, item) {
  const input = el("input", "rename");
  input.value = conversation.title;
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) conversation.title = input.value.trim().slice(0, 200);
    save();
    render();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

async function importFile(file) {
  try {
    const imported = parseImport(JSON.parse(await file.text()));
    store.conversations = [...imported, ...store.conversations];
    if (imported.length) store.current = imported[0].id;
    save();
    render();
    notify(`Imported ${imported.length} conversation(s).`, "info");
  } catch (e) {
    notify(`Could not import ${file.name}: ${e.message}`);
  }
}

// ---- the server ----

function authHeaders() {
  return settings.api_key ? { Authorization: `Bearer ${settings.api_key}` } : {};
}

async function fetchProps() {
  try {
    const response = await fetch("/props", { headers: authHeaders() });
    if (!response.ok) {
      const key = response.status === 401;
      const text = describe(response.status, await errorBody(response), server?.max_model_len);
      notify(text, "error", key ? "key" : "");
      if (key) showSettings(true, $("api_key"));
      return;
    }
    server = await response.json();
    if ($("notice").dataset.about === "key") $("notice").hidden = true;
  } catch (e) {
    notify(`Cannot reach the server: ${e.message}`);
  }
  renderSettings();
}

function requestBody(conversation) {
  const messages = [];
  if (settings.system?.trim()) messages.push({ role: "system", content: settings.system });
  for (const m of conversation.messages) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  for (const name of ["temperature", "top_p", "max_tokens"]) {
    if (settings[name] !== undefined && settings[name] !== "") body[name] = Number(settings[name]);
  }
  return body;
}

// Stream an answer to the conversation's last turn into a new assistant message; false when
// none came (an error, or stopped before the first piece), and then no message is kept.
async function generate(conversation) {
  const message = { role: "assistant", content: "" };
  const controller = new AbortController();
  const body = requestBody(conversation);
  conversation.messages.push(message);
  running = { conversation, message, controller };
  $("notice").hidden = true;
  render();
  const started = performance.now();
  let first = null;
  let last = null;
  let pieces = 0;
  let usage = null;
  let finish = null;
  let failure = null;
  let status = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    status = response.status;
    if (!response.ok) {
      failure = describe(status, await errorBody(response), server?.max_model_len);
    } else {
      for await (const data of events(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failure = `The answer was cut short: ${chunk.error.message}`;
          break;
        }
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (choice?.finish_reason) finish = choice.finish_reason;
        if (choice?.delta?.content) {
          last = performance.now();
          first ??= last;
          pieces += 1;
          message.content += choice.delta.content;
          scheduleRender();
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") failure = `Cannot reach the server: ${e.message}`;
  }
  const stopped = controller.signal.aborted;
  running = null;
  if (!message.content) {
    conversation.messages.splice(conversation.messages.indexOf(message), 1);
  } else {
    const tokens = usage?.completion_tokens ?? pieces;
    const seconds = ((last ?? performance.now()) - started) / 1000;
    // the decode rate: tokens after the first over the time they took
    const rate = tokens > 1 && last > first ? ((tokens - 1) * 1000) / (last - first) : null;
    message.stats = { tokens, seconds, rate, finish: stopped ? "stopped" : finish };
    if (failure) message.stats.error = failure;
  }
  save();
  render();
  if (failure) notify(failure, "error", status === 401 ? "key" : "");
  return Boolean(message.content);
}

async function send(text) {
  if (running || !text.trim()) return;
  const conversation = current() || newConversation();
  if (conversation.messages.at(-1)?.role === "user") {
    notify("The last message has no answer yet: retry it or edit it first.");
    return;
  }
  const untitled = !conversation.messages.length;
  if (untitled) conversation.title = text.trim().replace(/\s+/g, " ").slice(0, 48);
  const turn = { role: "user", content: text };
  conversation.messages.push(turn);
  $("input").value = "";
  save();
  if (await generate(conversation)) return;
  // no answer: the message goes back to the input box, to send again
  if (conversation.messages.at(-1) === turn) conversation.messages.pop();
  if (untitled) conversation.title = "New chat";
  if (!$("input").value) $("input").value = text;
  save();
  render();
}

function regenerate(conversation) {
  if (running) return;
  if (conversation.messages.at(-1)?.role === "assistant") conversation.messages.pop();
  generate(conversation);
}

function startEdit(conversation, index, node) {
  const box = el("textarea", "edit");
  box.value = conversation.messages[index].content;
  box.rows = Math.min(12, box.value.split("\n").length + 1);
  const saveAndSend = button("Save & send", () => {
    if (running || !box.value.trim()) return;
    conversation.messages[index].content = box.value;
    conversation.messages.length = index + 1; // the turns after it answered the old text
    generate(conversation);
  }, "primary");
  const actions = el("div", "actions");
  actions.append(saveAndSend, button("Cancel", render));
  node.replaceChildren(box, actions);
  box.focus();
}

// ---- rendering ----

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    if (running && running.conversation === current()) renderMessages();
  });
}

function statsText(stats) {
  const parts = [`${stats.tokens} tokens`, `${stats.seconds.toFixed(1)} s`];
  if (stats.rate) parts.push(`${stats.rate.toFixed(1)} tokens/s`);
  if (stats.finish === "stopped") parts.push("stopped");
  if (stats.finish === "length") parts.push("max tokens reached");
  if (stats.error) parts.push("error");
  return parts.join(" · ");
}

function renderMessage(conversation, message, index) {
  const node = el("article", `message ${message.role}`);
  node.appendChild(el("div", "role", message.role === "user" ? "You" : "Model"));
  const body = el("div", "body");
  if (message.role === "assistant") renderMarkdown(body, message.content);
  else body.textContent = message.content;
  node.appendChild(body);
  const meta = el("div", "meta");
  const streaming = running?.message === message;
  if (streaming) {
    node.classList.add("streaming");
    meta.appendChild(el("span", "stats", "generating…"));
  } else if (message.stats) {
    meta.appendChild(el("span", "stats", statsText(message.stats)));
  }
  if (!running && message.role === "user") {
    meta.appendChild(button("Edit", () => startEdit(conversation, index, node), "link"));
  }
  if (!running && index === conversation.messages.length - 1) {
    const again = message.role === "assistant" ? "Regenerate" : "Retry";
    meta.appendChild(button(again, () => regenerate(conversation), "link"));
  }
  node.appendChild(meta);
  return node;
}

function renderMessages() {
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const conversation = current();
  const nodes = (conversation?.messages ?? []).map((m, i) => renderMessage(conversation, m, i));
  if (!nodes.length) nodes.push(EMPTY);
  box.replaceChildren(...nodes);
  if (atBottom || running) box.scrollTop = box.scrollHeight;
}

function renderConversations() {
  const items = store.conversations.map((conversation) => {
    const item = el("li", conversation.id === store.current ? "active" : "");
    const open = button(conversation.title, () => switchTo(conversation.id), "title");
    open.title = conversation.title;
    item.append(
      open,
      button("✎", () => startRename(conversation, item), "icon rename-button"),
      button("×", () => remove(conversation), "icon delete-button"),
    );
    item.children[1].setAttribute("aria-label", "Rename");
    item.children[2].setAttribute("aria-label", "Delete");
    return item;
  });
  $("conversations").replaceChildren(...items);
}

function renderSettings() {
  for (const name of SETTINGS) $(name).value = settings[name] ?? "";
  const defaults = server?.defaults ?? {};
  for (const name of ["temperature", "top_p", "max_tokens"]) {
    $(name).placeholder = defaults[name] !== undefined ? `server: ${defaults[name]}` : "";
  }
  if (server) {
    $("model").textContent = server.model;
    $("max_tokens").max = server.max_model_len;
    $("server-info").textContent =
      `${server.model}: a context of ${server.max_model_len} tokens (prompt and answer).`;
  }
}

function render() {
  $("title").textContent = current()?.title ?? "New chat";
  $("send").hidden = Boolean(running);
  $("stop").hidden = !running;
  renderConversations();
  renderMessages();
}

function showSettings(show, focus) {
  $("settings").hidden = !show;
  $("settings-toggle").setAttribute("aria-expanded", String(show));
  if (show && focus) focus.focus();
}

// ---- wiring ----

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send($("input").value);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running?.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (!current()?.messages.length && current()) return; // already on an empty chat
  newConversation();
  save();
  render();
  $("input").focus();
});
$("export").addEventListener("click", () => exportFile(store.conversations));
$("import").addEventListener("change", (e) => {
  if (e.target.files[0]) importFile(e.target.files[0]);
  e.target.value = "";
});
$("settings-toggle").addEventListener("click", () => showSettings($("settings").hidden));
$("sidebar-toggle").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
$("notice-close").addEventListener("click", () => ($("notice").hidden = true));
for (const name of SETTINGS) {
  $(name).addEventListener("input", () => {
    settings[name] = $(name).value;
    save();
  });
}
$("api_key").addEventListener("change", fetchProps);
$("defaults").addEventListener("click", () => {
  for (const name of ["temperature", "top_p", "max_tokens"]) delete settings[name];
  save();
  renderSettings();
});

renderSettings();
render();
fetchProps();
