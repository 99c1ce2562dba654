// Loads the shoal dashboard in headless Chromium and checks it.
//
//   node check.mjs URL SCREENSHOT.png --peer ID ... --artifact ID ...
//                  [--route FROM>TO[:OUTCOME] [--chat BODY]]
//
// Fails (exit 1) on any console error, page error or failed request, or when
// an expected peer or artifact does not appear; saves a screenshot either way.
// --route FROM>TO[:OUTCOME]: the routing panel must show a request from FROM
// to TO with that outcome (default `forwarded`): a row of the events table,
// the arrow between the two nodes, both nodes, TO's serving card. --chat BODY: once that is shown, POST BODY to the node's
// /v1/chat/completions; the page must then animate the new request (a dot
// or pulse from FROM to TO) and list it: the screenshot is taken then.
import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const [url, shot] = args;
const want = { peer: [], artifact: [], route: [], chat: [] };
for (let i = 2; i < args.length; i += 2) {
  const k = args[i].replace(/^--/, "");
  if (!(k in want)) throw new Error(`unknown option ${args[i]}`);
  want[k].push(args[i + 1]);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const problems = [];
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => {
    // The event stream is cut when the page closes; that is not a failure.
    if (!r.url().endsWith("/events")) problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
  page.on("response", (r) => { if (r.status() >= 400) problems.push(`HTTP ${r.status()} ${r.url()}`); });
  await page.goto(url, { waitUntil: "load" });
  await page.locator("#live.on").waitFor({ timeout: 30000 });
  for (const p of want.peer) await page.locator(`[data-peer="${p}"]`).first().waitFor({ timeout: 30000 });
  for (const a of want.artifact) await page.locator(`[data-artifact="${a}"]`).first().waitFor({ timeout: 30000 });
  for (const spec of want.route) {
    const [r, outcome = "forwarded"] = spec.split(":");
    const [from, to] = r.split(">");
    const row = `#route-events tr[data-route-event="${r}"][data-outcome="${outcome}"]`;
    await page.locator(row).first().waitFor({ timeout: 30000 });
    // SVG lines may have an empty bounding box (vertical): attached, not "visible".
    await page.locator(`[data-route-arrow="${r}"][data-outcome="${outcome}"]`).first().waitFor({ state: "attached", timeout: 30000 });
    for (const n of [from, to]) await page.locator(`[data-route-node="${n}"]`).waitFor({ timeout: 30000 });
    await page.locator(`#route-cards tr[data-card="${to}"]`).first().waitFor({ timeout: 30000 });
    for (const body of want.chat) {
      const before = await page.locator(row).count();
      const res = await fetch(new URL("/v1/chat/completions", url), {
        method: "POST", headers: { "content-type": "application/json" }, body,
      });
      const text = await res.text();
      if (!res.ok) throw new Error(`chat request: HTTP ${res.status} ${text}`);
      // The new event flies from FROM to TO, then is listed.
      await page.locator(`[data-flight="${r}"][data-outcome="${outcome}"]`).first().waitFor({ state: "attached", timeout: 30000 });
      await page.screenshot({ path: shot.replace(/\.png$/, "-flight.png") });
      await page.waitForFunction(([sel, n]) => document.querySelectorAll(sel).length > n, [row, before], { timeout: 30000 });
    }
  }
  // One more live update after everything is shown: the stream keeps working.
  await page.waitForFunction(() => document.querySelectorAll("#peers tbody tr[data-peer]").length > 0, null, { timeout: 30000 });
  const summary = await page.evaluate(() => ({
    peers: [...document.querySelectorAll("#peers tbody tr[data-peer]")].map((r) => r.dataset.peer),
    artifacts: [...document.querySelectorAll("[data-artifact]")].map((a) => a.dataset.artifact),
    holders: document.querySelectorAll(".holder").length,
    route_events: [...document.querySelectorAll("#route-events tr[data-route-event]")]
      .map((r) => `${r.dataset.routeEvent} ${r.dataset.outcome}`),
    route_cards: document.querySelectorAll("#route-cards tr[data-card]").length,
  }));
  console.log(JSON.stringify(summary));
  await page.screenshot({ path: shot, fullPage: true });
} catch (e) {
  failed = true;
  problems.push(`check failed: ${e.message}`);
  try {
    const pages = browser.contexts().flatMap((c) => c.pages());
    if (pages[0]) await pages[0].screenshot({ path: shot, fullPage: true });
  } catch {}
} finally {
  await browser.close();
}
if (problems.length) {
  for (const p of problems) console.error(p);
  process.exit(1);
}
if (failed) process.exit(1);
