// Conversations kept in the browser (localStorage), and the API key for this
// tab only (sessionStorage). Nothing here is sent anywhere but to this node.

const KEY = "shoal.chat.v1";
const API_KEY = "shoal.chat.apikey";
const MODEL = "shoal.chat.model";

function id() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

// { current: id | null, list: [{ id, title, model, messages: [{ role, content, meta? }], updated }] }
export function load() {
  try {
    const s = JSON.parse(localStorage.getItem(KEY) || "null");
    if (s && Array.isArray(s.list)) {
      s.list = s.list.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages));
      if (!s.list.some((c) => c.id === s.current)) s.current = s.list[0]?.id ?? null;
      return s;
    }
  } catch (e) {
    console.warn("stored conversations unreadable; starting afresh", e);
  }
  return { current: null, list: [] };
}

export function save(state) {
  try {
    localStorage.setItem(KEY, JSON.stringify(state));
  } catch (e) {
    // Full or disabled storage: the chat goes on, only unsaved.
    console.warn("could not save the conversations", e);
  }
}

export function current(state) {
  return state.list.find((c) => c.id === state.current) ?? null;
}

export function create(state, model) {
  const c = { id: id(), title: "New chat", model, messages: [], updated: Date.now() };
  state.list.unshift(c);
  state.current = c.id;
  return c;
}

export function remove(state, cid) {
  state.list = state.list.filter((c) => c.id !== cid);
  if (state.current === cid) state.current = state.list[0]?.id ?? null;
}

export function titleFrom(text) {
  const t = text.replace(/\s+/g, " ").trim();
  return t.length > 40 ? t.slice(0, 39) + "…" : t || "New chat";
}

export const apiKey = {
  get: () => sessionStorage.getItem(API_KEY) || "",
  set: (k) => (k ? sessionStorage.setItem(API_KEY, k) : sessionStorage.removeItem(API_KEY)),
};

export const lastModel = {
  get: () => localStorage.getItem(MODEL) || "",
  set: (m) => { try { localStorage.setItem(MODEL, m); } catch {} },
};
