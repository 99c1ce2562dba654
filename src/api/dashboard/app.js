// The dashboard's data side: first paint from /dashboard/state, then live
// updates from the server-sent events at /events. Rendering is in view.js.
import { render } from "./view.js";
import { renderRoutes } from "./routes.js";

const state = { current: null, previous: null, rates: new Map() };

function update(snapshot) {
  state.previous = state.current;
  state.current = snapshot;
  trackRates(state);
  render(snapshot, state.rates);
  renderRoutes(snapshot);
}

// Transfer rates from successive snapshots, smoothed; ETA follows from them.
function trackRates(s) {
  const prev = new Map((s.previous?.transfers ?? []).map((t) => [t.id, t]));
  const dt = s.previous ? (s.current.time_ms - s.previous.time_ms) / 1000 : 0;
  const next = new Map();
  for (const t of s.current.transfers) {
    const p = prev.get(t.id);
    let rate = t.elapsed_ms > 0 ? t.have_bytes / (t.elapsed_ms / 1000) : 0;
    if (p && dt > 0) {
      const now = Math.max(0, (t.have_bytes - p.have_bytes) / dt);
      const old = s.rates.get(t.id);
      rate = old === undefined ? now : 0.6 * now + 0.4 * old;
    }
    next.set(t.id, rate);
  }
  s.rates = next;
}

function setLive(on) {
  const el = document.getElementById("live");
  el.textContent = on ? "live" : "reconnecting";
  el.className = "pill " + (on ? "on" : "off");
}

async function start() {
  try {
    const res = await fetch("/dashboard/state", { headers: { accept: "application/json" } });
    if (res.ok) update(await res.json());
  } catch (e) {
    console.warn("first snapshot failed", e);
  }
  const events = new EventSource("/events");
  events.addEventListener("open", () => setLive(true));
  events.addEventListener("error", () => setLive(false));
  events.addEventListener("state", (ev) => {
    setLive(true);
    update(JSON.parse(ev.data));
  });
}

start();
