// Talking to the node's OpenAI-compatible routes: the model list, and a
// streamed chat completion read as server-sent events.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(key, accept, json) {
  const h = { accept };
  if (json) h["content-type"] = "application/json";
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function failure(res) {
  let msg = `HTTP ${res.status}`;
  try {
    const body = await res.json();
    const m = body?.error?.message ?? body?.error;
    if (typeof m === "string" && m) msg = m;
  } catch {}
  return new ApiError(res.status, msg);
}

// GET /v1/models: [{ id, loaded, servable, ... }].
export async function listModels(key) {
  const res = await fetch("/v1/models", { headers: headers(key, "application/json", false) });
  if (!res.ok) throw await failure(res);
  const body = await res.json();
  return Array.isArray(body?.data) ? body.data : [];
}

// Yields each `data:` payload of an SSE body, parsed as JSON, until [DONE].
async function* events(body) {
  const reader = body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/)
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, ""))
          .join("\n");
        // A comment (keep-alive), an event without data, or anything after
        // [DONE]: the body is still read to its end, so the request completes.
        if (!data || finished) continue;
        if (data === "[DONE]") finished = true;
        else yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// POST /v1/chat/completions with stream: true. Calls `onText(piece)` as
// tokens arrive and fills `out` with what the answer's footer shows, as it
// learns it (so a stopped answer keeps what was known):
// { node, responseCache, usage, finish, firstTokenMs, endMs, pieces }
// (times from performance.now()). Rejects with an AbortError when `signal`
// aborts, or an ApiError.
export function newOutcome() {
  return { node: null, responseCache: false, usage: null, finish: null, firstTokenMs: null, endMs: null, pieces: 0 };
}

export async function chat({ model, messages, key, signal, temperature, maxTokens, onText, out }) {
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  if (Number.isFinite(temperature)) body.temperature = temperature;
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(key, "text/event-stream", true), body: JSON.stringify(body), signal,
    });
    if (!res.ok) throw await failure(res);
    out.node = res.headers.get("x-shoal-node");
    out.responseCache = res.headers.get("x-shoal-cache") === "hit";
    for await (const ev of events(res.body)) {
      if (ev.error) throw new ApiError(500, ev.error.message || "generation failed");
      if (ev.usage) out.usage = ev.usage;
      const c = ev.choices?.[0];
      if (!c) continue;
      const text = c.delta?.content;
      if (text) {
        if (out.firstTokenMs === null) out.firstTokenMs = performance.now();
        out.pieces++;
        onText(text);
      }
      if (c.finish_reason) out.finish = c.finish_reason;
    }
  } finally {
    out.endMs = performance.now();
  }
  return out;
}
