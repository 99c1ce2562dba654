// The chat page: pick a model, stream answers, keep conversations in the
// browser. Plain DOM; model text is only ever set as text (textContent),
// never parsed as HTML.
import * as store from "./store.js";
import { ApiError, chat, listModels, newOutcome } from "./stream.js";

const $ = (id) => document.getElementById(id);
const state = store.load();
let models = [];
let running = null; // { controller, conversation } while an answer streams

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v; else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function setStatus(text, bad = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("bad", bad);
}

// "12D3KooW…x7Yz9a": peer ids all start alike, their tail tells them apart.
const shortNode = (n) => (n && n.length > 16 ? `…${n.slice(-8)}` : n || "?");
// A model listed by its artifact id (64 hex digits) by the id's start.
const shortModel = (m) => (/^[0-9a-f]{64}$/i.test(m || "") ? `${m.slice(0, 12)}…` : m);

function metaLine(meta) {
  if (!meta) return null;
  const parts = [];
  if (meta.node) parts.push(el("span", { title: `answered by node ${meta.node}` }, `node ${shortNode(meta.node)}`));
  if (meta.responseCache) {
    parts.push(el("span", { class: "hit" }, "whole answer from the response cache"));
  } else if (Number.isFinite(meta.prompt)) {
    const cached = meta.cached ?? 0;
    parts.push(el("span", {
      class: cached > 0 ? "hit" : "",
      title: "prompt tokens whose KV came from the prefix cache / prompt tokens",
    }, cached > 0 ? `cache ${cached}/${meta.prompt} prompt tokens` : `no cache hit (${meta.prompt} prompt tokens)`));
  }
  if (Number.isFinite(meta.ttftMs)) parts.push(el("span", { title: "time to first token" }, `TTFT ${Math.round(meta.ttftMs)} ms`));
  if (Number.isFinite(meta.tokPerSec)) parts.push(el("span", {}, `${meta.tokPerSec.toFixed(1)} tok/s`));
  if (Number.isFinite(meta.completion)) parts.push(el("span", {}, `${meta.completion} tokens`));
  if (meta.stopped) parts.push(el("span", {}, "stopped"));
  else if (meta.finish === "length") parts.push(el("span", { title: "the answer hit the length limit" }, "cut at the length limit"));
  if (meta.error) parts.push(el("span", { class: "err" }, meta.error));
  // Separators for screen readers and copied text; the layout spaces them.
  const line = el("div", { class: "meta" }, ...parts.flatMap((p, i) => (i ? [el("span", { class: "sep" }, " · "), p] : [p])));
  line.dataset.node = meta.node ?? "";
  line.dataset.cached = String(meta.cached ?? "");
  line.dataset.prompt = String(meta.prompt ?? "");
  line.dataset.error = meta.error ?? "";
  return line;
}

function messageItem(m) {
  const text = el("div", { class: "text" }, m.content);
  const li = el("li", { class: `msg ${m.role}` },
    el("div", { class: "who", title: m.model || null }, m.role === "user" ? "You" : shortModel(m.model) || "Assistant"), text, metaLine(m.meta));
  return { li, text };
}

function renderMessages() {
  const c = store.current(state);
  const list = $("messages");
  list.replaceChildren(...(c?.messages ?? []).map((m) => messageItem(m).li));
  list.scrollTop = list.scrollHeight;
}

function renderConversations() {
  $("conversations").replaceChildren(...state.list.map((c) => {
    const open = el("button", { type: "button", class: "open", "aria-current": c.id === state.current ? "true" : null, title: c.title }, c.title);
    open.addEventListener("click", () => {
      if (running) return;
      state.current = c.id;
      store.save(state);
      if (c.model && models.some((m) => m.id === c.model)) $("model").value = c.model;
      render();
    });
    const del = el("button", { type: "button", class: "del", "aria-label": `Delete chat “${c.title}”`, title: "Delete this chat" }, "×");
    del.addEventListener("click", () => {
      if (running?.conversation === c) running.controller.abort();
      store.remove(state, c.id);
      store.save(state);
      render();
    });
    return el("li", { class: c.id === state.current ? "current" : "" }, open, del);
  }));
}

function render() {
  renderConversations();
  renderMessages();
}

function setRunning(on) {
  $("send").disabled = on || !$("model").value;
  $("stop").disabled = !on;
  $("model").disabled = on || models.length === 0;
}

async function loadModels() {
  const sel = $("model");
  try {
    models = await listModels(store.apiKey.get());
    $("key-form").hidden = true;
  } catch (e) {
    models = [];
    sel.replaceChildren(el("option", { value: "" }, "—"));
    if (e instanceof ApiError && e.status === 401) {
      $("key-form").hidden = false;
      setStatus(store.apiKey.get() ? "That API key was refused." : "Enter the API key your teacher gave you.", true);
      $("key").focus();
    } else {
      setStatus(`Could not list the models: ${e.message}`, true);
    }
    setRunning(false);
    return;
  }
  const usable = models.filter((m) => m.servable !== false);
  sel.replaceChildren(...models.map((m) => el("option", { value: m.id, disabled: m.servable === false, title: m.unservable_reason ?? m.id },
    shortModel(m.id) + (m.loaded ? " · loaded" : m.servable === false ? " · cannot be served" : ""))));
  const want = [store.current(state)?.model, store.lastModel.get(), usable.find((m) => m.loaded)?.id, usable[0]?.id];
  const pick = want.find((w) => w && usable.some((m) => m.id === w));
  sel.value = pick ?? "";
  if (!models.length) setStatus("This node has no models yet. Ask your teacher to add one.", true);
  else if (!usable.length) setStatus("None of this node's models can be served by it.", true);
  else setStatus("");
  setRunning(false);
}

function settings() {
  const t = parseFloat($("temperature").value);
  const n = parseInt($("max-tokens").value, 10);
  return { temperature: Number.isFinite(t) ? t : undefined, maxTokens: Number.isFinite(n) && n > 0 ? n : undefined };
}

async function send() {
  const input = $("input");
  const text = input.value.trim();
  const model = $("model").value;
  if (!text || !model || running) return;
  store.lastModel.set(model);
  let c = store.current(state);
  if (!c) c = store.create(state, model);
  c.model = model;
  if (c.messages.length === 0) c.title = store.titleFrom(text);
  c.messages.push({ role: "user", content: text });
  const history = [];
  const system = $("system").value.trim();
  if (system) history.push({ role: "system", content: system });
  for (const m of c.messages) if (m.content) history.push({ role: m.role, content: m.content });
  const answer = { role: "assistant", content: "", model, meta: null };
  c.messages.push(answer);
  c.updated = Date.now();
  input.value = "";
  store.save(state);
  render();

  const { li, text: textEl } = messageItem(answer);
  li.classList.add("pending");
  const list = $("messages");
  list.lastElementChild?.replaceWith(li);
  const controller = new AbortController();
  running = { controller, conversation: c };
  setRunning(true);
  setStatus("Waiting for the first token…");
  const t0 = performance.now();
  const out = newOutcome();
  const meta = {};
  try {
    await chat({
      model, messages: history, key: store.apiKey.get(), signal: controller.signal, out, ...settings(),
      onText: (piece) => {
        if (!answer.content) setStatus("");
        answer.content += piece;
        textEl.append(piece);
        const near = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
        if (near) list.scrollTop = list.scrollHeight;
      },
    });
  } catch (e) {
    if (e.name === "AbortError") meta.stopped = true;
    else if (e instanceof ApiError && e.status === 401) {
      meta.error = "API key needed";
      $("key-form").hidden = false;
    } else meta.error = e.message || String(e);
  }
  {
    meta.node = out.node;
    meta.responseCache = out.responseCache;
    meta.finish = out.finish;
    const u = out.usage;
    if (u) {
      meta.prompt = u.prompt_tokens;
      meta.cached = u.prompt_tokens_details?.cached_tokens ?? 0;
      meta.completion = u.completion_tokens;
    }
    if (out.firstTokenMs !== null) {
      meta.ttftMs = out.firstTokenMs - t0;
      const n = meta.completion ?? out.pieces;
      const secs = (out.endMs - out.firstTokenMs) / 1000;
      if (n > 1 && secs > 0) meta.tokPerSec = (n - 1) / secs;
    }
  }
  answer.meta = meta;
  running = null;
  c.updated = Date.now();
  store.save(state);
  if (store.current(state) === c) {
    li.classList.remove("pending");
    li.append(metaLine(meta));
  }
  // The status line is a live region: it announces the end, not every token.
  setStatus(meta.error ? `The answer failed: ${meta.error}` : meta.stopped ? "Stopped." : "Answer complete.", !!meta.error);
  setRunning(false);
  $("input").focus();
}

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => running?.controller.abort());
  $("new").addEventListener("click", () => {
    if (running) running.controller.abort();
    const c = store.current(state);
    if (!c || c.messages.length) store.create(state, $("model").value);
    store.save(state);
    render();
    $("input").focus();
  });
  $("clear").addEventListener("click", () => {
    const c = store.current(state);
    if (!c) return;
    if (running?.conversation === c) running.controller.abort();
    c.messages = [];
    c.title = "New chat";
    store.save(state);
    render();
  });
  $("model").addEventListener("change", () => {
    store.lastModel.set($("model").value);
    setRunning(false);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    store.apiKey.set($("key").value.trim());
    $("key").value = "";
    loadModels();
  });
  // Another tab changed the stored conversations: follow it when idle.
  window.addEventListener("storage", (e) => {
    if (!running && (e.key === null || e.key.startsWith("shoal.chat"))) {
      Object.assign(state, store.load());
      render();
    }
  });
}

wire();
render();
loadModels();
