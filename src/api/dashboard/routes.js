// "Requests across the mesh": where this node's generation requests went.
// Each node is a circle (this node in the middle); each new routing event is
// a dot travelling from the node that received the request to the node that
// ran the model (a pulse on the node for one served where it arrived), and
// stays as a fading arrow for a minute. Beside it: the last events and the
// serving cards (what each node has loaded, how busy it is). Plain DOM and
// SVG, no framework; animation with requestAnimationFrame.
import { el, svg, short, tail } from "./view.js";

const W = 460, H = 300, CX = W / 2, CY = H / 2 - 6, RX = 165, RY = 100;
const OUTCOMES = {
  forwarded: { color: "var(--peer)", label: "forwarded to a peer" },
  served_for_peer: { color: "var(--ok)", label: "served for a peer" },
  local: { color: "var(--local)", label: "served here" },
  retried: { color: "var(--bad)", label: "retried elsewhere" },
  failed: { color: "var(--bad)", label: "failed" },
};
const FLIGHT_MS = 1200, PULSE_MS = 1000, ARROW_MS = 60000, FRESH_MS = 10000;
const TABLE_ROWS = 10, STAGGER_MS = 250, MAX_FLIGHTS = 16;
const ME_R = 20, PEER_R = 14;

const seen = new Set(); // events already animated or judged old
let firstPaint = true;
const pos = new Map(); // peer id -> { x, y, r }
const flights = []; // { from, to, outcome, start }
let frame = 0;

const eventKey = (e) => `${e.at_ms}|${e.from}|${e.to}|${e.outcome}|${e.reason}|${e.model}`;
const colorOf = (outcome) => (OUTCOMES[outcome] ?? OUTCOMES.failed).color;
const ease = (t) => (t < 0.5 ? 2 * t * t : 1 - (-2 * t + 2) ** 2 / 2);

function clock(ms) {
  const d = new Date(ms);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}

// Model ids (hex) to the names cards give them.
function modelNames(r) {
  const names = new Map();
  for (const c of [r.local, ...r.cards]) for (const m of c.models) names.set(m.id, m.name);
  return names;
}

// A model by its card name; ids (64 hex digits) shortened.
function modelLabel(names, model) {
  const name = names.get(model.toLowerCase()) ?? model;
  return /^[0-9a-f]{64}$/i.test(name) ? short(name) : name;
}

function nodeLabel(r, id) {
  return id === r.me ? "this node" : tail(id);
}

// Node positions: this node in the middle, the others on an ellipse around
// it, in a stable (sorted) order; none straight above this node, where its
// label is (one peer: right; two: left and right; three: a triangle).
function layout(r, peers) {
  const others = new Set(peers.map((p) => p.peer_id));
  for (const c of r.cards) others.add(c.peer);
  for (const e of r.recent) { others.add(e.from); others.add(e.to); }
  others.delete(r.me);
  const ids = [...others].sort();
  pos.clear();
  pos.set(r.me, { x: CX, y: CY, r: ME_R });
  ids.forEach((id, i) => {
    const a = ids.length === 1 ? 0 : (2 * Math.PI * (i + 0.5)) / ids.length - Math.PI / 2;
    pos.set(id, { x: CX + RX * Math.cos(a), y: CY + RY * Math.sin(a), r: PEER_R });
  });
  return ids;
}

// A segment from a to b, shortened to the circles' edges and shifted
// sideways so that a→b and b→a do not overlap.
function segment(a, b, shift) {
  const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
  const ux = dx / len, uy = dy / len, nx = -uy * shift, ny = ux * shift;
  return {
    x1: a.x + ux * (a.r + 3) + nx, y1: a.y + uy * (a.r + 3) + ny,
    x2: b.x - ux * (b.r + 4) + nx, y2: b.y - uy * (b.r + 4) + ny,
  };
}

function markers() {
  const defs = svg("defs");
  for (const [outcome, o] of Object.entries(OUTCOMES)) {
    const m = svg("marker", { id: `arrow-${outcome}`, viewBox: "0 0 10 10", refX: 8, refY: 5,
      markerWidth: 5, markerHeight: 5, orient: "auto-start-reverse" });
    m.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: o.color }));
    defs.append(m);
  }
  return defs;
}

// One model summary under a node: load of its loaded models.
function loadLine(card) {
  if (!card) return "no serving card";
  const loaded = card.models.filter((m) => m.loaded);
  if (loaded.length === 0) return card.models.length ? `${card.models.length} on disk` : "no models";
  const run = loaded.reduce((n, m) => n + m.running, 0);
  const wait = loaded.reduce((n, m) => n + m.waiting, 0);
  const par = loaded.reduce((n, m) => n + m.parallel, 0);
  return `${loaded.length} loaded · ${run}/${par} busy` + (wait ? ` · ${wait} waiting` : "");
}

function drawBase(s, r, ids) {
  const base = document.getElementById("route-base");
  const cards = new Map(r.cards.map((c) => [c.peer, c]));
  cards.set(r.me, r.local);
  const banned = new Set(s.peers.filter((p) => p.banned).map((p) => p.peer_id));
  const items = [markers()];
  const me = pos.get(r.me);
  for (const id of ids) {
    const p = pos.get(id);
    items.push(svg("line", { x1: me.x, y1: me.y, x2: p.x, y2: p.y, stroke: "var(--line)", "stroke-width": 1 }));
  }
  // Recent requests between two nodes, one arrow per (from, to, outcome).
  const arrows = new Map();
  for (const e of r.recent) {
    const age = s.time_ms - e.at_ms;
    if (e.from === e.to || age > ARROW_MS || !pos.has(e.from) || !pos.has(e.to)) continue;
    const k = `${e.from}>${e.to}>${e.outcome}`;
    const a = arrows.get(k) ?? { e, n: 0, age };
    a.n += 1;
    a.age = Math.min(a.age, age);
    arrows.set(k, a);
  }
  for (const { e, n, age } of arrows.values()) {
    const shift = e.outcome === "retried" || e.outcome === "failed" ? 9 : 4;
    const seg = segment(pos.get(e.from), pos.get(e.to), shift);
    const opacity = (0.35 + 0.65 * (1 - Math.max(0, age) / ARROW_MS)).toFixed(2);
    items.push(svg("line", { ...seg, stroke: colorOf(e.outcome), "stroke-width": 2.5, "stroke-opacity": opacity,
      "stroke-dasharray": e.outcome === "retried" ? "5 3" : "", "marker-end": `url(#arrow-${e.outcome})`,
      "data-route-arrow": `${e.from}>${e.to}`, "data-outcome": e.outcome }));
    if (n > 1) {
      items.push(svg("text", { x: (seg.x1 + seg.x2) / 2 + 4, y: (seg.y1 + seg.y2) / 2 - 4, class: "count" }, `×${n}`));
    }
  }
  for (const [id, p] of pos) {
    const card = cards.get(id);
    const isMe = id === r.me;
    const loaded = card?.models.some((m) => m.loaded);
    const attrs = isMe
      ? { fill: "var(--have)", stroke: "var(--fg)", "stroke-width": 2 }
      : { fill: loaded ? "var(--peer)" : "var(--none)", stroke: banned.has(id) ? "var(--bad)" : "var(--peer)", "stroke-width": 1.5 };
    const g = svg("g", { "data-route-node": id });
    g.append(svg("title", {}, id));
    g.append(svg("circle", { cx: p.x, cy: p.y, r: p.r, ...attrs }));
    // This node's label above it, the others' below them.
    const y = isMe ? p.y - p.r - 20 : p.y + p.r + 13;
    g.append(svg("text", { x: p.x, y, "text-anchor": "middle", class: isMe ? "me" : "name" },
      isMe ? `this node · ${tail(id)}` : tail(id)));
    g.append(svg("text", { x: p.x, y: y + 12, "text-anchor": "middle" }, loadLine(card)));
    items.push(g);
  }
  if (ids.length === 0) {
    items.push(svg("text", { x: CX, y: CY + ME_R + 16, "text-anchor": "middle" }, "no peers"));
  }
  base.replaceChildren(...items);
}

// The animation layer, redrawn each frame while something moves.
function tick(now) {
  const fx = document.getElementById("route-fx");
  const items = [];
  for (let i = flights.length - 1; i >= 0; i--) {
    const f = flights[i];
    const a = pos.get(f.from), b = pos.get(f.to);
    const travel = f.from === f.to ? 0 : FLIGHT_MS;
    const t = now - f.start;
    if (!a || !b || t > travel + PULSE_MS) { flights.splice(i, 1); continue; }
    if (t < 0) continue;
    const color = colorOf(f.outcome);
    const tag = { "data-flight": `${f.from}>${f.to}`, "data-outcome": f.outcome };
    if (t < travel) {
      const p = ease(t / travel);
      const seg = segment(a, b, 4);
      const x = seg.x1 + (seg.x2 - seg.x1) * p, y = seg.y1 + (seg.y2 - seg.y1) * p;
      items.push(svg("line", { x1: seg.x1, y1: seg.y1, x2: x, y2: y, stroke: color, "stroke-width": 4,
        "stroke-opacity": 0.45, "stroke-linecap": "round", ...tag }));
      items.push(svg("circle", { cx: x, cy: y, r: 7, fill: color, stroke: "var(--bg)", "stroke-width": 2,
        class: "route-dot", ...tag }));
    } else {
      const p = (t - travel) / PULSE_MS;
      items.push(svg("circle", { cx: b.x, cy: b.y, r: b.r + 3 + 18 * p, fill: "none", stroke: color,
        "stroke-width": 3, "stroke-opacity": (1 - p).toFixed(2), class: "route-pulse", ...tag }));
    }
  }
  fx.replaceChildren(...items);
  frame = flights.length ? requestAnimationFrame(tick) : 0;
}

// Events not seen before start flights (on the first paint, only those of
// the last few seconds).
function launch(s, r) {
  const now = performance.now();
  let n = 0;
  for (const e of r.recent) {
    const k = eventKey(e);
    if (seen.has(k)) continue;
    seen.add(k);
    if (firstPaint && s.time_ms - e.at_ms > FRESH_MS) continue;
    if (flights.length >= MAX_FLIGHTS) flights.shift();
    flights.push({ from: e.from, to: e.to, outcome: e.outcome, start: now + STAGGER_MS * n++ });
  }
  // Forget keys of events the node no longer lists.
  if (seen.size > 4 * r.recent.length + 64) {
    const live = new Set(r.recent.map(eventKey));
    for (const k of seen) if (!live.has(k)) seen.delete(k);
  }
  firstPaint = false;
  if (flights.length && !frame) frame = requestAnimationFrame(tick);
}

function eventsTable(s, r, names) {
  const rows = r.recent.slice(-TABLE_ROWS).reverse().map((e) => {
    const where = e.from === e.to
      ? nodeLabel(r, e.to)
      : `${nodeLabel(r, e.from)} → ${nodeLabel(r, e.to)}`;
    const swatch = el("i", {});
    swatch.style.background = colorOf(e.outcome);
    return el("tr", { "data-route-event": `${e.from}>${e.to}`, "data-outcome": e.outcome, "data-model": e.model },
      el("td", { class: "mono" }, clock(e.at_ms)),
      el("td", { title: e.model }, modelLabel(names, e.model)),
      el("td", { class: "mono", title: `${e.from} → ${e.to}` }, where),
      el("td", { class: e.outcome === "failed" || e.outcome === "retried" ? "bad" : "" }, swatch, e.outcome),
      el("td", e.detail ? { title: e.detail } : {}, e.reason + (e.detail ? " *" : "")),
      el("td", {}, e.ttft_ms === null || e.ttft_ms === undefined ? "–" : `${e.ttft_ms} ms`));
  });
  const body = document.querySelector("#route-events tbody");
  if (rows.length === 0) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "no routed requests yet")));
  } else {
    body.replaceChildren(...rows);
  }
}

function cardsTable(r, names) {
  const rows = [];
  for (const c of [r.local, ...[...r.cards].sort((a, b) => a.peer.localeCompare(b.peer))]) {
    const who = nodeLabel(r, c.peer);
    const age = c.peer === r.me ? "now" : `${c.age_secs.toFixed(1)} s ago`;
    if (c.models.length === 0) {
      rows.push(el("tr", { "data-card": c.peer },
        el("td", { class: "mono", title: c.peer }, who), el("td", { class: "muted", colspan: 4 }, "no models"),
        el("td", { class: "muted" }, age)));
    }
    for (const m of c.models) {
      rows.push(el("tr", { "data-card": c.peer, "data-model": m.id },
        el("td", { class: "mono", title: c.peer }, who),
        el("td", { title: m.id }, modelLabel(names, m.id)),
        el("td", { class: m.loaded ? "" : "muted" }, m.loaded ? "loaded" : "on disk"),
        el("td", {}, m.loaded ? `${m.running} / ${m.waiting} / ${m.parallel}` : "–"),
        el("td", {}, m.loaded && m.decode_tps > 0 ? m.decode_tps.toFixed(1) : "–"),
        el("td", { class: "muted" }, age)));
    }
  }
  document.querySelector("#route-cards tbody").replaceChildren(...rows);
  const paused = document.getElementById("route-paused");
  paused.replaceChildren(...r.paused.map(([peer, why]) =>
    el("div", { class: "bad small", "data-paused": peer }, `paused ${tail(peer)}: ${why}`)));
}

function legend() {
  const box = document.getElementById("route-legend");
  if (box.childElementCount) return;
  for (const [outcome, o] of Object.entries(OUTCOMES)) {
    if (outcome === "retried") continue;
    const i = el("i", {});
    i.style.background = o.color;
    box.append(el("span", {}, i, outcome === "failed" ? "retried / failed" : o.label));
  }
}

/** Draws the routing panel of snapshot `s` (its `routes` is null when routing is off). */
export function renderRoutes(s) {
  const section = document.getElementById("routes-section");
  const r = s.routes;
  section.classList.toggle("off", !r);
  document.getElementById("routes-state").textContent = r
    ? `${r.cards.length} serving card(s) from peers · ${r.recent.length} recent event(s)`
    : "routing is off on this node";
  if (!r) {
    document.getElementById("route-base").replaceChildren();
    return;
  }
  legend();
  const names = modelNames(r);
  const ids = layout(r, s.peers);
  drawBase(s, r, ids);
  launch(s, r);
  eventsTable(s, r, names);
  cardsTable(r, names);
}
