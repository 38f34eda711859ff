// A Chromium page driven by the Python tests (test_console.py): one JSON command per
// line on stdin, one JSON answer per line on stdout. Debian's Chromium through
// playwright-core (no browser download), headless, no background networking.
"use strict";
const readline = require("readline");
const { chromium } = require("playwright-core");

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
      "--disable-default-apps", "--disable-sync", "--no-first-run", "--metrics-recording-only",
      "--disable-domain-reliability", "--disable-client-side-phishing-detection"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  let errors = [];
  const dialogs = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  page.on("pageerror", (e) => errors.push(`page: ${e.message}`));
  page.on("requestfailed", (r) => {
    // An EventSource closed by leaving its page is not an error.
    if (!r.url().includes("/stream")) errors.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
  page.on("dialog", async (d) => { dialogs.push(d.message()); await d.accept(); });
  const ops = {
    open: async (c) => { const t0 = Date.now(); await page.goto(c.url, { waitUntil: "load" }); return { ms: Date.now() - t0 }; },
    wait_selector: async (c) => { const t0 = Date.now(); await page.waitForSelector(c.selector, { timeout: c.timeout_ms ?? 10000, state: c.state ?? "visible" }); return { ms: Date.now() - t0 }; },
    wait_text: async (c) => {
      const t0 = Date.now();
      await page.waitForFunction(([s, t]) => [...document.querySelectorAll(s)].some((e) => e.innerText.includes(t)), [c.selector, c.text], { timeout: c.timeout_ms ?? 10000, polling: 20 });
      return { ms: Date.now() - t0 };
    },
    texts: async (c) => ({ texts: await page.$$eval(c.selector, (es) => es.map((e) => e.innerText)) }),
    fill: async (c) => { await page.fill(c.selector, c.value); return {}; },
    click: async (c) => { await page.click(c.selector); return {}; },
    screenshot: async (c) => { await page.screenshot({ path: c.path, fullPage: c.full ?? true }); return {}; },
    errors: async () => { const e = errors; errors = []; return { errors: e }; },
    dialogs: async () => ({ dialogs }),
    eval: async (c) => ({ value: await page.evaluate(c.expr) }),
  };
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const c = JSON.parse(line);
    if (c.op === "close") break;
    let answer;
    try {
      answer = { ok: true, ...(await ops[c.op](c)) };
    } catch (e) {
      answer = { ok: false, error: String(e && e.message || e) };
    }
    process.stdout.write(JSON.stringify(answer) + "\n");
  }
  await browser.close();
})().catch((e) => { process.stdout.write(JSON.stringify({ ok: false, error: String(e) }) + "\n"); process.exit(1); });
