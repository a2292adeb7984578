// Drives the ops dashboard in headless Chromium (Debian's package) with playwright-core.
//
//   node dashboard.mjs --url 'http://127.0.0.1:PORT/dashboard?token=T' --expect ENCOUNTER_ID
//        --screenshot PATH [--timeout-ms MS]
//
// Prints {"ready":true} once the page's subscriptions are live; then waits (without
// reloading the page) until the live feed shows the expected encounter, the billing
// tiles count it and the projections table is filled; saves a screenshot and prints
// {"ok":true,"tiles":{...}}. Exits 1 with {"error":...} otherwise.
import { chromium } from 'playwright-core';

const args = process.argv.slice(2);
const opt = { timeoutMs: 60000 };
for (let i = 0; i < args.length; i += 2) {
  const [key, value] = [args[i], args[i + 1]];
  if (key === '--url') opt.url = value;
  else if (key === '--expect') opt.expect = value;
  else if (key === '--screenshot') opt.screenshot = value;
  else if (key === '--timeout-ms') opt.timeoutMs = Number(value);
  else { console.error('unknown option ' + key); process.exit(2); }
}
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n');

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const problems = [];
  page.on('pageerror', (error) => problems.push(String(error)));
  await page.goto(opt.url);
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('live'), null, { timeout: opt.timeoutMs });
  // A reload would drop this marker: the change must arrive live.
  await page.evaluate(() => { window.__chartlineLoaded = true; });
  await page.waitForTimeout(300); // the subscribe messages reach the server
  print({ ready: true });
  await page.waitForFunction((expect) => {
    const feed = document.getElementById('feed').textContent;
    const billing = ['billing-ready', 'billing-held', 'billing-released']
      .map((id) => Number(document.getElementById(id).textContent) || 0)
      .reduce((a, b) => a + b, 0);
    const projections = document.getElementById('projections').children.length;
    const completed = Number(document.getElementById('completed').textContent) || 0;
    return window.__chartlineLoaded === true && feed.includes(expect) && billing >= 1
      && projections >= 1 && completed >= 1;
  }, opt.expect, { timeout: opt.timeoutMs, polling: 100 });
  const tiles = await page.evaluate(() => Object.fromEntries(
    [...document.querySelectorAll('.tile .n')].map((n) => [n.id, n.textContent])));
  if (opt.screenshot) await page.screenshot({ path: opt.screenshot, fullPage: true });
  if (problems.length) throw new Error('page errors: ' + problems.join('; '));
  print({ ok: true, tiles });
} catch (error) {
  print({ error: String(error && error.message || error) });
  await browser.close();
  process.exit(1);
}
await browser.close();
