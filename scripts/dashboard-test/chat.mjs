// Drives the shoal chat page (/chat) in headless Chromium against a real node.
//
//   node chat.mjs URL SCREENSHOT.png --model ID --node PEER_ID [--key API_KEY] [--short]
//
// Picks the model, sends a message and sees its tokens arrive while the
// answer streams, checks the footer (node that answered, prompt tokens,
// TTFT, tok/s), sends a second message and sees a prefix-cache hit, reloads
// and finds the conversation kept, starts a long answer and stops it. With
// --key the node needs an API key: the page must ask for it first. With
// --short only the first message. Fails (exit 1) on any console error, page
// error, failed request or HTTP error other than the expected ones; saves a
// screenshot (and SCREENSHOT-phone.png at phone width) either way.
import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const [url, shot] = args;
const opt = { model: null, node: null, key: null, short: false };
for (let i = 2; i < args.length; i++) {
  const k = args[i].replace(/^--/, "");
  if (k === "short") { opt.short = true; continue; }
  if (!(k in opt)) throw new Error(`unknown option ${args[i]}`);
  opt[k] = args[++i];
}
if (!opt.model || !opt.node) throw new Error("--model and --node are required");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const problems = [];
const report = {};
let failed = false;
let phase = "load";
const T = 120000;

function check(cond, what) {
  if (!cond) throw new Error(what);
}

// The texts and footers of the answers shown.
async function answers(page) {
  return page.evaluate(() => [...document.querySelectorAll("#messages .msg.assistant")].map((m) => ({
    text: m.querySelector(".text").textContent,
    pending: m.classList.contains("pending"),
    meta: m.querySelector(".meta") ? { ...m.querySelector(".meta").dataset, line: m.querySelector(".meta").textContent } : null,
  })));
}

// Sets the longest answer in the settings panel (opened as a user would).
async function maxTokens(page, n) {
  if (!(await page.locator("#settings").evaluate((d) => d.open))) await page.click("#settings summary");
  await page.fill("#max-tokens", String(n));
}

// Sends `text` with Enter; returns the lengths of the answer's text seen
// while it was still streaming, and the finished answer.
async function ask(page, text) {
  const before = (await answers(page)).length;
  await page.fill("#input", text);
  await page.press("#input", "Enter");
  await page.locator("#messages .msg.assistant").nth(before).waitFor({ timeout: T });
  const seen = new Set();
  const t0 = Date.now();
  for (;;) {
    const a = (await answers(page))[before];
    if (!a) throw new Error("the answer vanished");
    if (!a.pending) return { seen: [...seen], answer: a };
    if (a.text.length > 0) seen.add(a.text.length);
    if (Date.now() - t0 > T) throw new Error("the answer never finished");
    await page.waitForTimeout(15);
  }
}

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const t = m.text();
    // The key prompt follows an expected 401; a stopped stream may log its abort.
    if (opt.key && /status of 401/.test(t)) return;
    problems.push(`console: ${t}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => {
    // Chromium reports every streamed (text/event-stream) fetch as aborted
    // once read, even when read to its end: the page's own footer says
    // whether an answer failed (checked below), not this event.
    if (r.url().endsWith("/v1/chat/completions") && r.failure()?.errorText === "net::ERR_ABORTED") return;
    problems.push(`request failed (${phase}): ${r.url()} ${r.failure()?.errorText}`);
  });
  page.on("response", (r) => {
    if (r.status() === 401 && opt.key && r.url().endsWith("/v1/models")) return;
    if (r.status() >= 400) problems.push(`HTTP ${r.status()} ${r.url()}`);
  });
  await page.goto(url, { waitUntil: "load" });

  if (opt.key) {
    await page.locator("#key-form:not([hidden])").waitFor({ timeout: T });
    await page.fill("#key", opt.key);
    await page.click("#key-form button");
    await page.locator("#key-form").waitFor({ state: "hidden", timeout: T });
  }

  // Pick the model (listed whether or not it is loaded).
  await page.locator(`#model option[value="${opt.model}"]`).waitFor({ state: "attached", timeout: T });
  await page.selectOption("#model", opt.model);
  check(!(await page.locator("#key-form").isVisible()), "the API key form shows though the models are listed");
  await maxTokens(page, 48);

  // Shift+Enter is a new line, not a send.
  await page.fill("#input", "line one");
  await page.press("#input", "Shift+Enter");
  await page.type("#input", "line two");
  check(await page.inputValue("#input") === "line one\nline two", "Shift+Enter did not make a new line");
  check(await page.locator("#messages .msg").count() === 0, "Shift+Enter sent the message");
  await page.fill("#input", "");

  phase = "first";
  // 1. An answer streams in: its text grows while it is pending.
  const first = await ask(page, "Name three colours of the rainbow.");
  report.first = first.answer;
  report.first_growth = first.seen.length;
  check(first.answer.text.length > 0, "the first answer is empty");
  check(first.seen.length >= 2, `no streaming seen (text lengths while pending: ${first.seen})`);
  check(first.answer.meta, "no footer under the first answer");
  check(!first.answer.meta.error, `the first answer failed: ${first.answer.meta.error}`);
  check(first.answer.meta.node === opt.node, `footer node ${first.answer.meta.node} is not ${opt.node}`);
  check(Number(first.answer.meta.prompt) > 0, "no prompt token count");
  check(/TTFT \d+ ms/.test(first.answer.meta.line) && /tok\/s/.test(first.answer.meta.line),
    `no TTFT or tok/s in "${first.answer.meta.line}"`);

  if (!opt.short) {
    phase = "second";
    // 2. The follow-up's prompt starts with the first exchange: a prefix-cache hit.
    const second = await ask(page, "Now name two more. <b id=\"x\">no markup</b><img src=x>");
    // Text is shown as text: no element made from it, the markup visible.
    check(await page.locator("#messages b, #messages img").count() === 0, "message text became HTML");
    check((await page.locator("#messages .msg.user .text").nth(1).textContent()).includes("<b id="),
      "the markup is not shown as text");
    report.second = second.answer;
    const m = second.answer.meta;
    check(m && !m.error, `the follow-up failed: ${m?.error}`);
    check(Number(m.cached) > 0, `no prefix-cache hit on the follow-up: ${JSON.stringify(m)}`);
    check(Number(m.cached) <= Number(m.prompt), "more cached tokens than prompt tokens");
    check(/cache \d+\/\d+ prompt tokens/.test(m.line), `the footer does not show the hit: "${m.line}"`);

    phase = "reload";
    // 3. A reload keeps the conversation.
    const kept = await answers(page);
    await page.reload({ waitUntil: "load" });
    await page.locator("#messages .msg.assistant").nth(1).waitFor({ timeout: T });
    const after = await answers(page);
    check(after.length === kept.length, `${after.length} answers after reload, ${kept.length} before`);
    for (let i = 0; i < kept.length; i++) {
      check(after[i].text === kept[i].text, `answer ${i} changed across the reload`);
      check(after[i].meta?.cached === kept[i].meta?.cached, `answer ${i}'s footer changed across the reload`);
    }
    check(await page.locator("#conversations li").count() === 1, "not one conversation after reload");

    phase = "stop";
    // 4. Stop: a long answer ends at once when asked, keeping what came.
    await page.locator(`#model option[value="${opt.model}"]`).waitFor({ state: "attached", timeout: T });
    await maxTokens(page, 2000);
    await page.fill("#input", "Tell me a very long story about a lighthouse keeper.");
    await page.press("#input", "Enter");
    const last = page.locator("#messages .msg.assistant").nth(2);
    await page.waitForFunction(() => {
      const m = document.querySelectorAll("#messages .msg.assistant")[2];
      return m && m.classList.contains("pending") && m.querySelector(".text").textContent.length > 20;
    }, null, { timeout: T });
    await page.click("#stop");
    await last.locator(".meta").waitFor({ timeout: 10000 });
    const stopped = (await answers(page))[2];
    await page.waitForTimeout(1000);
    const later = (await answers(page))[2];
    report.stopped = stopped;
    check(!stopped.meta.error, `the stopped answer shows an error: ${stopped.meta.error}`);
    check(/stopped/.test(stopped.meta.line), `the footer does not say stopped: "${stopped.meta.line}"`);
    check(later.text === stopped.text && stopped.text.length > 20, "the text changed after stop");
    check(await page.locator("#send").isEnabled(), "send stays disabled after stop");
  }

  await page.screenshot({ path: shot, fullPage: true });
  // Phone width: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 1, `the page is ${overflow}px wider than a phone screen`);
  await page.screenshot({ path: shot.replace(/\.png$/, "-phone.png") });
  console.log(JSON.stringify(report));
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
