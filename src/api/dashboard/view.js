// Renders a dashboard snapshot into the page. Plain DOM, no framework.

const SVG = "http://www.w3.org/2000/svg";
const COLORS = { local: "var(--local)", peer: "var(--peer)", origin: "var(--origin)" };
const TTFT_COLORS = { miss: "var(--origin)", kv: "var(--peer)", response: "var(--ok)" };

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? `${n} B` : `${v.toFixed(1)} ${units[u]}`;
}

export function duration(s) {
  if (!isFinite(s)) return "–";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

export const short = (id) => (id.length > 16 ? `${id.slice(0, 6)}…${id.slice(-6)}` : id);
// Peer ids all start alike (12D3KooW…): their tail tells them apart.
export const tail = (id) => id.slice(-6);
// "/ip4/127.0.0.1/tcp/7071/p2p/12D3…" → "127.0.0.1:7071"
function hostPort(addr) {
  const m = /^\/ip[46]\/([^/]+)\/(?:tcp|udp)\/(\d+)/.exec(addr || "");
  return m ? `${m[1]}:${m[2]}` : addr || "–";
}

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

export function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function renderNode(s) {
  const n = s.node;
  document.getElementById("node").textContent =
    `node ${short(n.peer_id)} · up ${duration(n.uptime_secs)}` +
    (n.offline ? " · offline mode" : "") + (n.mdns ? "" : " · mDNS off");
}

function renderPeers(s) {
  const body = document.querySelector("#peers tbody");
  body.replaceChildren(...s.peers.map((p) =>
    el("tr", { "data-peer": p.peer_id },
      el("td", { class: "mono", title: p.peer_id }, short(p.peer_id)),
      el("td", { class: "mono", title: p.addr }, hostPort(p.addr)),
      el("td", {}, duration(p.connected_secs)),
      el("td", p.banned ? { class: "bad" } : {}, p.banned ? `banned: ${p.banned}` : "ok"))));
  if (s.peers.length === 0) body.replaceChildren(el("tr", {}, el("td", { colspan: 4, class: "muted" }, "no peers")));

  // A star: this node in the middle, links to each peer.
  const g = document.getElementById("links");
  const c = 120, r = 85, items = [];
  s.peers.forEach((p, i) => {
    const a = (2 * Math.PI * i) / Math.max(1, s.peers.length) - Math.PI / 2;
    const x = c + r * Math.cos(a), y = c + r * Math.sin(a);
    const color = p.banned ? "var(--bad)" : "var(--ok)";
    items.push(svg("line", { x1: c, y1: c, x2: x, y2: y, stroke: color, "stroke-width": 2,
      "stroke-dasharray": p.banned ? "4 3" : "" }));
    items.push(svg("circle", { cx: x, cy: y, r: 9, fill: color }));
    items.push(svg("text", { x: x + (x >= c ? 14 : -14), y: y + 4, "text-anchor": x >= c ? "start" : "end" }, tail(p.peer_id)));
  });
  items.push(svg("circle", { cx: c, cy: c, r: 13, fill: "var(--have)" }));
  items.push(svg("text", { x: c + 18, y: c + 4 }, "this node"));
  g.replaceChildren(...items);
}

function availabilityBar(bins) {
  const bar = el("div", { class: "bar" });
  for (const b of bins) {
    const pct = Math.max(0, Math.min(100, b));
    bar.append(el("span", { style: `background: color-mix(in srgb, var(--have) ${pct}%, var(--none))` }));
  }
  return bar;
}

function renderArtifacts(s) {
  const root = document.getElementById("artifacts");
  if (s.artifacts.length === 0) { root.replaceChildren(el("p", { class: "muted" }, "no artifacts yet")); return; }
  root.replaceChildren(...s.artifacts.map((a) => {
    const title = a.names.length ? a.names.join(", ") : short(a.id);
    const box = el("div", { class: "artifact", "data-artifact": a.id },
      el("div", {}, el("strong", {}, title), " ", el("span", { class: "muted mono", title: a.id }, `${short(a.id)} · ${bytes(a.size)} · ${a.chunks} chunks`)));
    for (const h of a.holders) {
      const pct = a.chunks ? Math.round((100 * h.present) / a.chunks) : 0;
      box.append(el("div", { class: "holder" },
        el("span", { class: "mono", title: h.peer }, h.peer === "self" ? "this node" : short(h.peer)),
        availabilityBar(h.bins),
        el("span", {}, `${pct}%`)));
    }
    return box;
  }));
}

function renderTransfers(s, rates) {
  const root = document.getElementById("transfers");
  if (s.transfers.length === 0) { root.replaceChildren(el("p", { class: "muted" }, "none")); return; }
  root.replaceChildren(...s.transfers.map((t) => {
    const rate = rates.get(t.id) ?? 0;
    const left = t.total_bytes - t.have_bytes;
    const eta = t.phase === "done" ? 0 : rate > 0 ? left / rate : Infinity;
    const pct = t.total_bytes ? (100 * t.have_bytes) / t.total_bytes : 100;
    return el("div", { class: "transfer", "data-transfer": t.id },
      el("div", {}, el("strong", {}, t.name || short(t.id)), " ", el("span", { class: "muted" }, t.phase)),
      el("div", { class: "meter" }, el("span", { style: `width: ${pct.toFixed(1)}%` })),
      el("div", { class: "meta" },
        `${bytes(t.have_bytes)} of ${bytes(t.total_bytes)} · ${bytes(rate)}/s · ETA ${t.phase === "done" ? "done" : duration(eta)}` +
        ` · ${t.peers} source(s) · peers ${bytes(t.bytes_from_peers)}, origin ${bytes(t.bytes_from_origin)}, local ${t.local_chunks} chunk(s)` +
        (t.error ? ` · error: ${t.error}` : "")));
  }));
}

function ratioRow(label, r) {
  const pct = r.ratio === null ? null : Math.round(100 * r.ratio);
  return el("div", { class: "ratio" }, el("span", {}, label),
    el("div", { class: "meter" }, el("span", { style: `width: ${pct ?? 0}%; background: var(--ok)` })),
    el("span", {}, pct === null ? "no lookups" : `${pct}% (${r.hits}/${r.hits + r.misses})`));
}

function renderCaches(s) {
  const c = s.caches;
  const total = c.bytes_by_source.reduce((n, [, b]) => n + b, 0);
  const stack = el("div", { class: "stack", title: "chunk bytes by source" });
  const legend = el("div", { class: "legend small" });
  for (const [src, b] of c.bytes_by_source) {
    if (total > 0 && b > 0) stack.append(el("span", { style: `width: ${(100 * b) / total}%; background: ${COLORS[src]}` }));
    legend.append(el("span", {}, el("i", { style: `background: ${COLORS[src]}` }), `${src} ${bytes(b)}`));
  }
  document.getElementById("caches").replaceChildren(
    el("div", {}, "Where chunk bytes came from"), stack, legend,
    el("p", { class: "small muted" }, `${c.fetches_ok} chunk fetches ok, ${c.fetches_failed} failed`),
    ratioRow("KV cache (RAM)", c.kv_ram), ratioRow("KV cache (disk)", c.kv_disk),
    ratioRow("Response cache", c.response_cache));
}

function renderTtft(s) {
  const g = document.getElementById("ttft");
  const W = 480, H = 160, L = 40, B = 20;
  const pts = s.ttft;
  const items = [svg("line", { x1: L, y1: H - B, x2: W, y2: H - B, stroke: "var(--line)" }),
    svg("line", { x1: L, y1: 0, x2: L, y2: H - B, stroke: "var(--line)" })];
  if (pts.length === 0) {
    items.push(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no requests yet"));
  } else {
    const max = Math.max(...pts.map((p) => p.secs), 0.001);
    const t0 = Math.min(...pts.map((p) => p.at_ms)), t1 = Math.max(...pts.map((p) => p.at_ms), t0 + 1);
    items.push(svg("text", { x: L - 4, y: 10, "text-anchor": "end" }, `${max.toFixed(2)} s`));
    items.push(svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
    for (const p of pts) {
      const x = L + 6 + ((W - L - 12) * (p.at_ms - t0)) / (t1 - t0);
      const y = H - B - ((H - B - 8) * p.secs) / max;
      items.push(svg("circle", { cx: x, cy: y, r: 3.5, fill: TTFT_COLORS[p.cache] }, undefined));
    }
    let lx = L + 6;
    for (const [k, label] of [["miss", "cold"], ["kv", "warm (KV)"], ["response", "response cache"]]) {
      items.push(svg("circle", { cx: lx, cy: H - 6, r: 3.5, fill: TTFT_COLORS[k] }));
      items.push(svg("text", { x: lx + 7, y: H - 2 }, label));
      lx += 110;
    }
  }
  g.replaceChildren(...items);
}

function renderDisk(s) {
  const d = s.disk;
  const root = document.getElementById("disk");
  if (d.quota === null) {
    root.replaceChildren(el("div", {}, `${bytes(d.used)} used · no quota`));
    return;
  }
  const pct = Math.min(100, (100 * d.used) / Math.max(1, d.quota));
  root.replaceChildren(
    el("div", { class: "meter" }, el("span", { style: `width: ${pct.toFixed(1)}%; background: ${pct > 90 ? "var(--warn)" : "var(--have)"}` })),
    el("div", { class: "small" }, `${bytes(d.used)} of ${bytes(d.quota)} (${pct.toFixed(0)}%)`));
}

export function render(s, rates) {
  renderNode(s);
  renderPeers(s);
  renderArtifacts(s);
  renderTransfers(s, rates);
  renderCaches(s);
  renderTtft(s);
  renderDisk(s);
}
