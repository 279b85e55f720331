// What the page keeps in localStorage, and conversations exported to and imported from JSON
// files. An imported file is checked, and its text later only ever set as text.

import { el } from "./markdown.js";

export function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value && typeof value === "object" ? value : fallback;
  } catch {
    return fallback;
  }
}

export function newId() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

// Every conversation, saved as a JSON file (the browser's download).
export function exportFile(conversations) {
  const data = { format: "llama2-chat", version: 1, conversations };
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  link.download = `llama2-chat-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

// An imported answer's stats, kept only when well formed.
function checkedStats(stats) {
  const number = (x) => typeof x === "number" && Number.isFinite(x);
  if (!stats || !number(stats.tokens) || !number(stats.seconds)) return {};
  const rate = number(stats.rate) ? stats.rate : null;
  const finish = typeof stats.finish === "string" ? stats.finish : null;
  const error = typeof stats.error === "string" ? { error: stats.error } : {};
  return { stats: { tokens: stats.tokens, seconds: stats.seconds, rate, finish, ...error } };
}

// The conversations in an exported file (or a bare list, or one conversation), checked: each
// message a user or assistant turn with text. Imported ones get fresh ids.
export function parseImport(data) {
  const list = Array.isArray(data) ? data : data?.conversations ?? (data?.messages ? [data] : null);
  if (!Array.isArray(list)) throw new Error("no conversations in the file");
  return list.map((c, i) => {
    if (!Array.isArray(c?.messages)) throw new Error(`conversation ${i + 1} has no messages`);
    const messages = c.messages.map((m, j) => {
      if (!["user", "assistant"].includes(m?.role) || typeof m.content !== "string") {
        throw new Error(`conversation ${i + 1}, message ${j + 1}: needs a role and text`);
      }
      return { role: m.role, content: m.content, ...checkedStats(m.stats) };
    });
    const title = typeof c.title === "string" && c.title.trim() ? c.title : "Imported chat";
    return { id: newId(), title: title.slice(0, 200), created: Date.now(), messages };
  });
}
