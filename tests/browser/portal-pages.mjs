// Times the portal's pages in headless Chromium (run by tests/src/bin/portal_bench.rs, for bench/portal.sh;
// playwright-core is installed beside it): for each page, from the start of navigation
// until the page shows its data, ROUNDS times; prints JSON with p50, p95 and max in milliseconds.
import { chromium } from "playwright-core";

const base = process.env.SR_PORTAL;
const item = process.env.SR_ITEM;
const rounds = Number(process.env.ROUNDS || 10);
const browser = await chromium.launch({ executablePath: process.env.SR_CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox", "--disable-dev-shm-usage"] });
const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
const page = await context.newPage();
const errors = [];
page.on("pageerror", (e) => errors.push(e.message));
// The seeded master targets do not run, so the item page's recovery points answer 409 (which the
// page shows); the browser logs each such answer, which is not an error of the page.
page.on("console", (m) => { if (m.type() === "error" && !m.text().includes("status of 409")) errors.push(m.text()); });
await page.goto(`${base}/portal/`);
await page.getByLabel("API token").fill(process.env.SR_TOKEN);
await page.getByRole("button", { name: "Sign in" }).click();
await page.locator("#worst table").waitFor();

// (hash, what shows the data)
const pages = [
  ["#/", "#worst tbody tr"],
  ["#/items", "#items tbody tr"],
  [`#/items/${item}`, "dl.kv dd"],
  ["#/jobs", "#jobs tbody tr"],
  ["#/infrastructure", "#infra tbody tr"],
  ["#/events", "main table"],
];
const out = {};
for (const [hash, ready] of pages) {
  const ms = [];
  for (let i = 0; i < rounds; i++) {
    // From another page, as a click on the navigation would.
    await page.evaluate(() => { location.hash = "#/policies"; });
    await page.locator("main h1", { hasText: "Replication policies" }).waitFor();
    await page.waitForLoadState("networkidle");
    const t0 = Date.now();
    await page.evaluate((h) => { location.hash = h; }, hash);
    await page.locator(ready).first().waitFor();
    ms.push(Date.now() - t0);
  }
  ms.sort((a, b) => a - b);
  const at = (q) => ms[Math.round((ms.length - 1) * q)];
  out[hash] = { p50_ms: at(0.5), p95_ms: at(0.95), max_ms: at(1), rounds };
}
await browser.close();
if (errors.length) { console.error(errors.join("\n")); process.exit(1); }
console.log(JSON.stringify(out));
