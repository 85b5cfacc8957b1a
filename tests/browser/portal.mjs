// Drives the portal in headless Chromium, as an operator would, for tests/tests/portal.rs. One phase a
// run (the Rust test checks the disks between phases); it prints one line of JSON with what it saw,
// and exits non-zero on any failure, console error or uncaught page error.
//
//   SR_PORTAL=https://127.0.0.1:PORT SR_TOKEN=... SR_SHOTS=dir node portal.mjs <phase>
//
// Phases:
//   protect   sign in, enable protection of SR_MACHINE under SR_POLICY, watch it reach Protected
//   failover  pick SR_INSTANT_SECS (Unix seconds) on the timeline, run a test failover by
//             keyboard, follow its job to the end
//   cleanup   clean up the test failover, follow its job
//   manage    an admin creates a policy, a network mapping, a plan, a registration key and a token
//   reader    sign in with a reader token: every page shows, no action is offered
//   phone     the overview and the item at phone width, with no page-wide horizontal scroll
//   quickstart  sign in at the address (SR_PORTAL) with the token srctl quickstart printed
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

const phase = process.argv[2];
const base = process.env.SR_PORTAL;
const token = process.env.SR_TOKEN;
const shots = process.env.SR_SHOTS;
const item = process.env.SR_ITEM;
const timeout = Number(process.env.SR_TIMEOUT_MS || 120000);
// The instant to fail over to, as the date field takes it (UTC, whole seconds).
const instant = process.env.SR_INSTANT_SECS ? new Date(Number(process.env.SR_INSTANT_SECS) * 1000).toISOString().slice(0, 19).replace("T", " ") : null;
fs.mkdirSync(shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.SR_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const phone = phase === "phone";
const context = await browser.newContext({
  // The deployment's own CA signed the server's certificate; the test trusts it as an operator who
  // imported that CA would.
  ignoreHTTPSErrors: true,
  viewport: phone ? { width: 390, height: 844 } : { width: 1280, height: 800 },
  timezoneId: "UTC",
});
const page = await context.newPage();
page.setDefaultTimeout(timeout);
const problems = [];
page.on("console", (m) => { if (m.type() === "error") problems.push(`console error: ${m.text()}`); });
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
const out = { phase };
const shot = (name) => page.screenshot({ path: path.join(shots, `${phase}-${name}.png`), fullPage: true });

async function signIn(secret) {
  await page.goto(`${base}/`);
  await page.getByLabel("API token").fill(secret);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Overview" }).waitFor();
}

async function followJob() {
  await page.waitForURL(/#\/jobs\/\d+$/);
  const id = Number(page.url().split("/").pop());
  await page.locator("#job-steps").waitFor();
  // Live: the page updates by itself until the job ends.
  await page.waitForFunction(() => {
    const h = document.querySelector("h1");
    return h && /succeeded|failed/.test(h.textContent);
  }, null, { timeout });
  const heading = await page.locator("h1").textContent();
  const steps = await page.locator("#job-steps li").evaluateAll((lis) => lis.map((li) => [li.dataset.state, li.textContent]));
  const error = await page.locator("#job-error").count() ? await page.locator("#job-error").textContent() : null;
  return { id, succeeded: heading.includes("succeeded"), steps, error };
}

try {
  if (phase === "protect") {
    await signIn(token);
    await shot("overview-empty");
    await page.getByRole("navigation").getByRole("link", { name: "Replicated items" }).click();
    await page.getByRole("button", { name: "Enable protection" }).click();
    const dlg = page.getByRole("dialog", { name: "Enable protection" });
    await dlg.getByLabel("Machine").selectOption(process.env.SR_MACHINE);
    const policy = await dlg.getByLabel("Policy").locator("option", { hasText: `${process.env.SR_POLICY} (` }).first().getAttribute("value");
    await dlg.getByLabel("Policy").selectOption(policy);
    await shot("enable-dialog");
    await dlg.getByRole("button", { name: "Enable protection" }).click();
    out.enable = await followJob();
    await shot("enable-job");
    // Watch initial replication on the item's page until Protected.
    await page.goto(`${base}/portal/#/items`);
    await page.getByRole("link", { name: process.env.SR_MACHINE }).first().click();
    await page.waitForURL(/#\/items\/\d+$/);
    out.item = Number(page.url().split("/").pop());
    const seen = new Set();
    const deadline = Date.now() + timeout;
    for (;;) {
      const h = (await page.locator("h1").textContent()) || "";
      seen.add(h.replace(process.env.SR_MACHINE, "").trim());
      if (h.includes("protected")) break;
      if (Date.now() > deadline) throw new Error(`the item did not reach Protected; seen: ${[...seen]}`);
      await page.waitForTimeout(200);
    }
    out.states = [...seen];
    await page.locator("#tl-status", { hasText: "Retained" }).waitFor();
    await shot("item-protected");
  } else if (phase === "failover") {
    await signIn(token);
    await page.goto(`${base}/portal/#/items/${item}`);
    await page.locator("#tl-status", { hasText: "Retained" }).waitFor();
    // The instant comes from the date field; the slider then moves by keyboard, one second a key.
    await page.getByLabel("Or type it (UTC)").fill(instant);
    await page.getByLabel("Or type it (UTC)").press("Enter");
    const typed = await page.locator("#tl-chosen").textContent();
    const slider = page.getByRole("slider", { name: "recovery instant" });
    await slider.focus();
    await page.keyboard.press("ArrowRight");
    const moved = await page.locator("#tl-chosen").textContent();
    await page.keyboard.press("ArrowLeft");
    const back = await page.locator("#tl-chosen").textContent();
    out.chosen = { typed, moved, back };
    if (typed === moved || moved === back) throw new Error(`the slider did not move the instant by keyboard: ${JSON.stringify(out.chosen)}`);
    // Back to the exact instant asked for.
    await page.getByLabel("Or type it (UTC)").fill(instant);
    await page.getByLabel("Or type it (UTC)").press("Enter");
    out.chosen.final = await page.locator("#tl-chosen").textContent();
    if (out.chosen.final !== `${instant}.000000 UTC`) throw new Error(`the typed instant ${instant} was taken as ${out.chosen.final}`);
    await slider.focus();
    await shot("timeline");
    // Tab from the slider to the Test failover button, then Enter, by keyboard only.
    for (let i = 0; i < 40; i++) {
      await page.keyboard.press("Tab");
      const focused = await page.evaluate(() => document.activeElement && document.activeElement.textContent);
      if (focused === "Test failover") break;
    }
    if ((await page.evaluate(() => document.activeElement.textContent)) !== "Test failover") throw new Error("Test failover is not reachable by Tab");
    await page.keyboard.press("Enter");
    const dlg = page.getByRole("dialog", { name: "Test failover" });
    await dlg.waitFor();
    out.confirm = await dlg.textContent();
    await shot("test-failover-confirm");
    await dlg.getByRole("button", { name: "Start test failover" }).click();
    out.job = await followJob();
    await shot("test-failover-job");
    await page.goto(`${base}/portal/#/items/${item}`);
    await page.getByRole("button", { name: "Clean up test failover" }).waitFor();
    await shot("item-test-failover");
  } else if (phase === "cleanup") {
    await signIn(token);
    await page.goto(`${base}/portal/#/items/${item}`);
    await page.getByRole("button", { name: "Clean up test failover" }).click();
    await page.getByRole("dialog", { name: "Clean up test failover" }).getByRole("button", { name: "Clean up" }).click();
    out.job = await followJob();
    await page.goto(`${base}/portal/#/jobs`);
    await page.locator("#jobs table").waitFor();
    await shot("jobs");
    await page.goto(`${base}/portal/#/`);
    await page.locator("#worst table").waitFor();
    await page.locator(".uplot").first().waitFor();
    await shot("overview");
  } else if (phase === "manage") {
    // An admin's forms: a policy, a network mapping, a recovery plan, a registration key, a token.
    await signIn(token);
    const submit = async (dialogName, fields, button) => {
      const dlg = page.getByRole("dialog", { name: dialogName });
      await dlg.waitFor();
      for (const [id, value] of fields) {
        const f = dlg.locator(`#${id}`);
        if ((await f.evaluate((e) => e.tagName)) === "SELECT") await f.selectOption(value); else await f.fill(value);
      }
      await dlg.getByRole("button", { name: button }).click();
      await dlg.waitFor({ state: "detached" });
    };
    await page.goto(`${base}/portal/#/policies`);
    await page.getByRole("button", { name: "New policy" }).click();
    await submit("New replication policy", [["p-name", "silver"], ["p-rpo_threshold_secs", "120"]], "Create");
    await page.locator("main td", { hasText: "silver" }).waitFor();
    await page.goto(`${base}/portal/#/networks`);
    await page.getByRole("button", { name: "New mapping" }).click();
    await submit("New network mapping", [["n-name", "lan"], ["n-source", "10.0.0.0/24"], ["n-target", "10.1.0.0/24"], ["n-target_network", "dr-lan"]], "Create");
    await page.locator("main td", { hasText: "dr-lan" }).waitFor();
    await page.goto(`${base}/portal/#/plans`);
    await page.getByRole("button", { name: "New plan" }).click();
    await submit("New recovery plan", [["rp-name", "app"], ["rp-groups", item]], "Create");
    await page.getByRole("link", { name: "app", exact: true }).click();
    await page.getByRole("heading", { name: "Recovery plan app" }).waitFor();
    out.planButtons = await page.locator("main button").evaluateAll((bs) => bs.map((b) => b.textContent));
    await shot("plan");
    await page.goto(`${base}/portal/#/infrastructure`);
    await page.locator("#agents table").waitFor();
    await page.getByRole("button", { name: "New registration key" }).click();
    await submit("New registration key", [["k-role", "agent"], ["k-ttl", "1"]], "Create key");
    const keyDialog = page.getByRole("dialog", { name: "Registration key" });
    out.key = await keyDialog.locator(".secret").textContent();
    await keyDialog.getByRole("button", { name: "Done" }).click();
    await page.getByRole("button", { name: "New API token" }).click();
    await submit("New API token", [["t-name", "ops"], ["t-role", "operator"]], "Create token");
    const tokenDialog = page.getByRole("dialog", { name: "API token" });
    out.token = await tokenDialog.locator(".secret").textContent();
    await shot("infrastructure");
    await tokenDialog.getByRole("button", { name: "Done" }).click();
  } else if (phase === "reader") {
    await signIn(token);
    out.who = await page.locator("#who [data-role]").textContent();
    const pages = ["#/", "#/items", `#/items/${item}`, "#/jobs", "#/plans", "#/policies", "#/infrastructure", "#/networks", "#/events"];
    out.buttons = {};
    for (const p of pages) {
      await page.goto(`${base}/portal/${p}`);
      // The page's data arrived (its first refresh is done) before counting what it offers.
      await page.locator("main[data-loaded]").waitFor();
      const labels = await page.locator("main button").evaluateAll((bs) => bs.map((b) => b.textContent));
      out.buttons[p] = labels;
      await shot(p.replace(/[#/]+/g, "-").replace(/^-|-$/g, "") || "overview");
    }
    await page.goto(`${base}/portal/#/items/${item}`);
    await page.locator("#item-actions p").waitFor();
    await shot("item");
    // The API refuses a reader's action even when it is sent by hand.
    // (Sent from outside the page, whose console would rightly log the refusal.)
    const forced = await context.request.post(`${base}/v1/items/${item}/resync`, { headers: { Authorization: `Bearer ${token}` } });
    out.forced = forced.status();
  } else if (phase === "quickstart") {
    // The address and token srctl quickstart prints.
    await signIn(token);
    out.who = await page.locator("#who [data-role]").textContent();
    await page.locator("#worst table").waitFor();
    out.worst = await page.locator("#worst tbody tr").count();
    await shot("overview");
  } else if (phase === "phone") {
    await signIn(token);
    out.overflow = {};
    for (const p of ["#/", "#/items", `#/items/${item}`, "#/jobs"]) {
      await page.goto(`${base}/portal/${p}`);
      await page.locator("main[data-loaded]").waitFor();
      out.overflow[p] = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      await shot(p.replace(/[#/]+/g, "-").replace(/^-|-$/g, "") || "overview");
    }
  } else {
    throw new Error(`unknown phase ${phase}`);
  }
} catch (e) {
  problems.push(`${phase}: ${e.message}`);
  await shot("failure").catch(() => {});
}
out.problems = problems;
await browser.close();
console.log(JSON.stringify(out));
process.exit(problems.length ? 1 : 0);
