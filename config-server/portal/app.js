// The portal: one page that signs in with an API token and calls the REST API, which decides who may
// do what. Every element is built with h() from text nodes (never from HTML strings), so nothing the
// API returns can run as script. Pages refresh their data every few seconds while they are shown.
"use strict";

const TOKEN_KEY = "sr-token";
const REFRESH_MS = 2000;
// Rows a long table shows unless asked for all (a page stays fast with thousands of items).
const ROWS = 200;
let me = null; // { name, role }
let timer = null; // the shown page's refresh
let page = 0; // bumped on each navigation: a late answer for an earlier page is dropped

// ---- DOM and formatting helpers -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// What identifies a focusable element across a re-render: a refresh rebuilds a table, and the same
// link or button gets the focus back (keyboard users keep their place).
// Row buttons carry `data-key` (the row's id or name), so a Delete keeps its row; the position among
// equal keys settles the rest.
function focusKey(el) {
  return `${el.tagName}|${el.getAttribute("href") || ""}|${el.id}|${el.dataset.action || ""}|${el.dataset.key || ""}|${el.textContent}`;
}

const FOCUSABLE = "a, button, input, select, textarea";

function fill(el, ...children) {
  const active = document.activeElement;
  let key = null;
  let nth = 0;
  if (active && active !== document.body && el.contains(active)) {
    key = focusKey(active);
    nth = [...el.querySelectorAll(FOCUSABLE)].filter((e) => focusKey(e) === key).indexOf(active);
  }
  el.replaceChildren();
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  if (key) {
    const again = [...el.querySelectorAll(FOCUSABLE)].filter((e) => focusKey(e) === key)[Math.max(0, nth)];
    if (again) again.focus();
  }
}

function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

// Times are shown in UTC everywhere, as srctl, the API and the logs give them.
function when(secs) {
  if (!secs) return "—";
  return `${new Date(secs * 1000).toISOString().slice(0, 19).replace("T", " ")} UTC`;
}

// A recovery instant, to the microsecond, in UTC (as the API and srctl give them).
function whenUs(us) {
  if (us === null || us === undefined) return "—";
  const d = new Date(Math.floor(us / 1000));
  return `${d.toISOString().slice(0, 19).replace("T", " ")}.${String(us % 1000000).padStart(6, "0")} UTC`;
}

// "2026-12-04 15:30:12", "2026-12-04T15:30:12.5", or RFC 3339 with a zone; no zone means UTC.
function parseInstantUs(text) {
  let t = text.trim().replace(" ", "T");
  if (!/(Z|[+-]\d\d:?\d\d)$/i.test(t)) t += "Z";
  const m = t.match(/\.(\d+)/);
  const ms = Date.parse(t.replace(/\.\d+/, ""));
  if (Number.isNaN(ms)) return null;
  const frac = m ? Number((m[1] + "000000").slice(0, 6)) : 0;
  return ms * 1000 + frac;
}

const STATE_CLASS = {
  protected: "s-ok", failed_back: "s-ok", committed: "s-ok",
  initial_replication: "s-info", enabling_protection: "s-info", resynchronizing: "s-info", reprotecting: "s-info",
  failover_in_progress: "s-info", failing_back: "s-info", disabling_protection: "s-info", failed_over: "s-info",
  resync_required: "s-warn", unprotected: "s-warn",
  critical: "s-bad", failed: "s-bad", running: "s-info", succeeded: "s-ok", cancelled: "s-warn",
};

function stateBadge(name) {
  return h("span", { class: `state ${STATE_CLASS[name] || ""}` }, String(name).replaceAll("_", " "));
}

function canOperate() { return me && (me.role === "operator" || me.role === "admin"); }
function isAdmin() { return me && me.role === "admin"; }

// ---- The API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, `The configuration server did not answer ${method} ${path} (${e.message}). Is it running and reachable?`);
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!res.ok) {
    const why = (data && data.error) || text || res.statusText;
    if (res.status === 401 && path !== "/v1/whoami") {
      signOut(`Signed out: ${why}`);
    }
    throw new ApiError(res.status, `${method} ${path} failed (${res.status}): ${why}`);
  }
  return data;
}

// The message under the header. `source` says who set it: a page's refresh clears its own error once
// it works again, and the reason for a sign-out outlives the move to the sign-in page.
let bannerSource = null;
function banner(message, kind, source) {
  const b = document.getElementById("banner");
  bannerSource = message ? source || null : null;
  if (!message) { b.hidden = true; b.textContent = ""; return; }
  b.className = kind === "info" ? "info" : "";
  b.textContent = message;
  b.hidden = false;
}

// ---- Sign-in ---------------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  if (message) banner(message, "error", "signout");
  location.hash = "#/signin";
}

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token.trim());
  try {
    me = await api("GET", "/v1/whoami");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    throw e;
  }
}

function renderWho() {
  const who = document.getElementById("who");
  const nav = document.getElementById("nav");
  if (!me) { fill(who); nav.hidden = true; return; }
  nav.hidden = false;
  fill(who, h("span", { "data-role": me.role }, `${me.name} (${me.role})`),
    h("button", { type: "button", onclick: () => signOut() }, "Sign out"));
}

function signInPage(main) {
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off", spellcheck: "false", required: true });
  const form = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        await signIn(input.value);
        banner(null);
        // The page asked for before signing in (a deep link), else the overview.
        const target = location.hash && location.hash !== "#/signin" ? location.hash : "#/";
        if (location.hash === target) route(); else location.hash = target;
      } catch (e) {
        banner(`Sign-in failed: ${e.message}`);
      }
    },
  },
  h("label", { for: "token" }, "API token", input),
  h("p", { class: "muted" }, "After the quickstart, the admin token is in the file it names (srctl tokens create makes others)."),
  h("button", { class: "primary", type: "submit" }, "Sign in"));
  fill(main, h("div", { class: "signin" }, h("h1", {}, "Sign in"), form));
  input.focus();
}

// ---- Dialogs ---------------------------------------------------------------------------------------

// A modal with fields; resolves with the form's values, or null when cancelled. `showOnly` is for
// what is only read (a secret shown once): one button closes it.
function dialog(title, fields, confirmLabel, danger, showOnly) {
  return new Promise((resolve) => {
    const d = h("dialog", { "aria-label": title });
    const form = h("form", { method: "dialog" },
      h("h2", {}, title),
      fields,
      h("div", { class: "actions" },
        !showOnly && h("button", { type: "button", onclick: () => { d.close(); resolve(null); } }, "Cancel"),
        h("button", { type: "submit", class: danger ? "danger" : "primary", value: "ok" }, confirmLabel)));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const values = Object.fromEntries(new FormData(form).entries());
      d.close();
      resolve(values);
    });
    d.addEventListener("cancel", () => resolve(null));
    d.addEventListener("close", () => d.remove());
    d.append(form);
    document.body.append(d);
    d.showModal();
  });
}

// Runs an action after a confirmation, then shows the job it started.
async function act(title, text, confirmLabel, call, danger) {
  const ok = await dialog(title, [h("p", {}, text)], confirmLabel, danger);
  if (!ok) return null;
  return run(call);
}

// One action at a time: a second click while one runs (a commit or a test failover answers when its
// job ends) would only be refused by the API.
let acting = false;

async function run(call) {
  if (acting) { banner("An action is still running: wait for it to answer.", "info"); return null; }
  acting = true;
  banner("Working…", "info");
  try {
    const r = await call();
    // A move, drain or balance answers its moves, each a job: follow the first.
    const job = r && (r.job ?? (Array.isArray(r.moves) && r.moves.length ? r.moves[0].job : null));
    if (job !== undefined && job !== null) {
      banner(null);
      location.hash = `#/jobs/${job}`;
    } else {
      banner("Done.", "info");
      refreshNow();
    }
    return r;
  } catch (e) {
    banner(e.message);
    return null;
  } finally {
    acting = false;
  }
}

// ---- Charts (uPlot) --------------------------------------------------------------------------------

// Chart axes in UTC, like every other time the portal shows.
const utc = (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC");

// The chart drawn in each element, destroyed before it is replaced (uPlot keeps a global listener
// per chart until then).
const charts = new WeakMap();
function dropChart(el) {
  const old = charts.get(el);
  if (old) { old.destroy(); charts.delete(el); }
}

function chart(el, title, label, xs, ys, fmt) {
  dropChart(el);
  el.replaceChildren();
  if (!window.uPlot) { el.append(h("p", { class: "muted" }, "Charts are loading.")); return null; }
  if (xs.length < 2) { el.append(h("p", { class: "muted" }, "Collecting: one sample every 10 seconds.")); return null; }
  // Measured inside the panel's padding, so the chart never pushes the page wider.
  const box = h("div", {});
  el.append(box);
  const width = Math.max(200, box.clientWidth || 600);
  const u = new uPlot({
    title, width, height: 180,
    series: [{}, { label, stroke: "#0b5cad", width: 2, points: { show: true, size: 4 }, value: (_, v) => (v === null ? "—" : fmt(v)) }],
    axes: [{}, { values: (_, t) => t.map(fmt), size: 70 }],
    scales: { x: { time: true } },
    tzDate: utc,
  }, [xs, ys], box);
  charts.set(el, u);
  return u;
}

// ---- Router ----------------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/?$/, overviewPage],
  [/^#\/items(?:\?.*)?$/, itemsPage],
  [/^#\/items\/(\d+)$/, itemPage],
  [/^#\/jobs$/, jobsPage],
  [/^#\/jobs\/(\d+)$/, jobPage],
  [/^#\/plans$/, plansPage],
  [/^#\/plans\/([^/]+)$/, planPage],
  [/^#\/policies$/, policiesPage],
  [/^#\/infrastructure$/, infraPage],
  [/^#\/networks$/, networksPage],
  [/^#\/events$/, eventsPage],
];

let refresher = null;
function refreshNow() { if (refresher) refresher(); }

// Shows a page: `setup(main, ...args)` builds it and returns its refresh function, called now and
// every REFRESH_MS until the next navigation.
async function route() {
  clearInterval(timer);
  refresher = null;
  const mine = ++page;
  const main = document.getElementById("main");
  const hash = location.hash || "#/";
  if (!me && sessionStorage.getItem(TOKEN_KEY)) {
    try { me = await api("GET", "/v1/whoami"); } catch { me = null; }
  }
  renderWho();
  if (!me || hash === "#/signin") {
    if (me) { location.hash = "#/"; return; }
    signInPage(main);
    return;
  }
  for (const a of document.querySelectorAll("nav a")) {
    const href = a.getAttribute("href");
    const current = href === "#/" ? hash === "#/" || hash === "#" : hash.startsWith(href);
    if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const found = ROUTES.find(([re]) => re.test(hash));
  if (!found) { fill(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the overview"))); return; }
  let args;
  try { args = hash.match(found[0]).slice(1).map(decodeURIComponent); } catch {
    fill(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the overview")));
    return;
  }
  main.replaceChildren();
  delete main.dataset.loaded;
  const refresh = found[1](main, ...args);
  if (!refresh) return;
  let busy = false;
  refresher = async () => {
    // One refresh at a time (a slow server does not pile them up), none in a hidden tab.
    if (mine !== page || busy || document.hidden) return;
    busy = true;
    try {
      await refresh(() => mine === page);
      if (mine === page) {
        main.dataset.loaded = "1";
        if (bannerSource === "refresh") banner(null);
      }
    } catch (e) {
      if (mine === page) banner(e.message, "error", "refresh");
    } finally {
      busy = false;
    }
  };
  await refresher();
  if (mine !== page) return;
  timer = setInterval(refresher, REFRESH_MS);
}

// ---- Overview --------------------------------------------------------------------------------------

function overviewPage(main) {
  const cards = h("div", { class: "cards", id: "states" });
  const alerts = h("div", { class: "panel", id: "alerts" });
  const worst = h("div", { class: "panel scroll", id: "worst" });
  const running = h("div", { class: "panel scroll", id: "running" });
  const comps = h("div", { class: "panel scroll", id: "components" });
  const rpoChart = h("div", { class: "chart panel" });
  const churnChart = h("div", { class: "chart panel" });
  main.append(h("h1", {}, "Overview"), cards,
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Alerts firing"), alerts),
      h("section", {}, h("h2", {}, "Worst RPOs"), worst)),
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "RPO over the last hour"), rpoChart),
      h("section", {}, h("h2", {}, "Churn over the last hour"), churnChart)),
    h("section", {}, h("h2", {}, "Jobs running"), running),
    h("section", {}, h("h2", {}, "Process servers and master targets"), comps));
  let lastHistory = -1;
  return async (current) => {
    const o = await api("GET", "/v1/overview");
    if (!current()) return;
    fill(cards, h("a", { class: "card", href: "#/items" }, h("div", { class: "n" }, o.items), h("div", { class: "l" }, "replicated items")),
      h("a", { class: "card", href: "#/infrastructure" }, h("div", { class: "n" }, `${o.agents.up}/${o.agents.total}`), h("div", { class: "l" }, "agents reporting")),
      o.by_state.filter(([, n]) => n > 0).map(([s, n]) =>
        h("a", { class: "card", href: `#/items?state=${s}` }, h("div", { class: "n" }, n), h("div", { class: "l" }, stateBadge(s)))));
    fill(alerts, o.alerts.length === 0 ? h("p", { class: "muted" }, "No alerts.") :
      h("ul", {}, o.alerts.map((a) => h("li", {},
        h("span", { class: `sev-${a.severity}` }, a.severity), " ",
        a.item !== null ? h("a", { href: `#/items/${a.item}` }, a.subject) : a.subject, ": ", a.message))));
    fill(worst, o.worst.length === 0 ? h("p", { class: "muted" }, "No item replicates yet.") :
      h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Item"), h("th", {}, "Machine"), h("th", {}, "RPO"), h("th", {}, "Threshold"))),
        h("tbody", {}, o.worst.map((w) => h("tr", {},
          h("td", {}, h("a", { href: `#/items/${w.item}` }, w.item)), h("td", {}, w.machine),
          h("td", { class: w.rpo_secs > w.threshold_secs ? "s-bad" : "" }, duration(w.rpo_secs)), h("td", {}, duration(w.threshold_secs)))))));
    fill(running, o.running.length === 0 ? h("p", { class: "muted" }, "No job is running.") :
      h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Job"), h("th", {}, "Kind"), h("th", {}, "Target"), h("th", {}, "Step"), h("th", {}, "Progress"))),
        h("tbody", {}, o.running.map((j) => h("tr", {},
          h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)), h("td", {}, j.kind), h("td", {}, j.target), h("td", {}, j.step || "—"),
          h("td", {}, h("progress", { max: 100, value: j.progress, "aria-label": `job ${j.id} progress` }), ` ${j.progress}%`))))));
    const servers = o.components.filter((c) => c.role === "process-server" || c.role === "master-target");
    fill(comps, servers.length === 0 ? h("p", { class: "muted" }, "None registered.") : componentTable(servers, false));
    const last = o.history.length ? o.history[o.history.length - 1].time : 0;
    if (last !== lastHistory) {
      lastHistory = last;
      const xs = o.history.map((s) => s.time);
      chart(rpoChart, "", "worst RPO", xs, o.history.map((s) => s.worst_rpo_secs), duration);
      chart(churnChart, "", "churn", xs, o.history.map((s) => s.churn_bytes_per_sec), (v) => `${bytes(v)}/s`);
    }
  };
}

function componentTable(list, withActions) {
  return h("table", {}, h("thead", {}, h("tr", {},
    h("th", {}, "Name"), h("th", {}, "Role"), h("th", {}, "Health"), h("th", {}, "Last heartbeat"), h("th", {}, "Items"),
    h("th", {}, "Cache"), h("th", {}, "Churn"), h("th", {}, "Free"), withActions && h("th", {}, "Actions"))),
  h("tbody", {}, list.map((c) => h("tr", {},
    h("td", {}, c.name), h("td", {}, c.role),
    h("td", {}, c.revoked ? stateBadge("revoked") : c.up ? h("span", { class: "state s-ok" }, c.draining ? "up, draining" : "up") : h("span", { class: "state s-bad" }, "down")),
    h("td", {}, c.heartbeat_age_secs === null ? "never" : `${duration(c.heartbeat_age_secs)} ago`),
    h("td", {}, c.items), h("td", {}, bytes(c.cache_bytes)), h("td", {}, `${bytes(c.churn_bytes_per_sec)}/s`),
    h("td", {}, c.role === "master-target" ? bytes(c.free_bytes) : "—"),
    withActions && h("td", {}, componentActions(c))))));
}

function componentActions(c) {
  const out = [];
  if (c.revoked) return "—";
  if (canOperate() && c.role === "process-server") {
    if (c.draining) out.push(h("button", { type: "button", "data-key": c.name, onclick: () => act(`Resume ${c.name}`, `${c.name} will take new items again.`, "Resume", () => api("POST", `/v1/process-servers/${encodeURIComponent(c.name)}/resume`)) }, "Resume"));
    else out.push(h("button", { type: "button", "data-key": c.name, onclick: () => act(`Drain ${c.name}`, `No new items go to ${c.name}, and each of its items moves to another process server (one job each).`, "Drain", () => api("POST", `/v1/process-servers/${encodeURIComponent(c.name)}/drain`)) }, "Drain"));
  }
  if (isAdmin()) out.push(h("button", { type: "button", class: "danger", "data-key": c.name, onclick: () => act(`Revoke ${c.name}`, `${c.name}'s certificate is revoked: it can no longer reach any service of this deployment. This cannot be undone; it must register again with a new key.`, "Revoke", () => api("POST", `/v1/components/${encodeURIComponent(c.name)}/revoke`), true) }, "Revoke"));
  return out.length ? h("div", { class: "actions" }, out) : "—";
}

// ---- Replicated items ------------------------------------------------------------------------------

function itemsPage(main) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const state = h("select", { id: "f-state", name: "state" }, h("option", { value: "" }, "any"));
  const text = h("input", { id: "f-text", type: "search", placeholder: "machine, process server, master target" });
  const table = h("div", { class: "panel scroll", id: "items" });
  const count = h("p", { class: "muted", id: "items-count" });
  const all = h("input", { type: "checkbox", id: "f-all" });
  let items = [];
  let policies = {};
  let stateOptions = "";
  const draw = () => {
    const s = state.value;
    const t = text.value.trim().toLowerCase();
    const matching = items.filter((i) => (!s || i.state_name === s) &&
      (!t || [i.machine, i.process_server, i.master_target, String(i.id)].some((v) => v && v.toLowerCase().includes(t))));
    // A page shows ROWS rows unless asked for all: the filters find the rest.
    const shown = all.checked ? matching : matching.slice(0, ROWS);
    fill(count, matching.length > shown.length ? `The first ${shown.length} of ${matching.length} matching items (${items.length} in all): narrow them with the filters, or show all.`
      : `${matching.length} of ${items.length} items`);
    fill(table, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Id"), h("th", {}, "Machine"), h("th", {}, "State"), h("th", {}, "RPO"),
      h("th", {}, "Last caught up"), h("th", {}, "Policy"), h("th", {}, "Process server"), h("th", {}, "Master target"))),
    h("tbody", {}, shown.map((i) => h("tr", {},
      h("td", {}, h("a", { href: `#/items/${i.id}` }, i.id)), h("td", {}, h("a", { href: `#/items/${i.id}` }, i.machine)),
      h("td", {}, stateBadge(i.state_name), i.problem ? h("span", { class: "s-bad", title: i.problem }, " !") : null),
      h("td", { class: i.rpo_alert ? "s-bad" : "" }, duration(i.rpo_seconds)),
      h("td", {}, i.rpo_seconds === null ? "—" : when(Date.now() / 1000 - i.rpo_seconds)),
      h("td", {}, policies[i.policy] || i.policy), h("td", {}, i.process_server || "—"), h("td", {}, i.master_target || "—"))))));
  };
  state.addEventListener("change", draw);
  text.addEventListener("input", draw);
  all.addEventListener("change", draw);
  const enable = canOperate() && h("button", { type: "button", class: "primary", onclick: enableProtection }, "Enable protection");
  main.append(h("h1", {}, "Replicated items"),
    h("div", { class: "filters" }, h("label", { for: "f-state" }, "State", state), h("label", { for: "f-text" }, "Search", text),
    h("label", { for: "f-all" }, "Show all", all), enable), count, table);
  return async (current) => {
    const [list, pols] = await Promise.all([api("GET", "/v1/items"), api("GET", "/v1/policies")]);
    if (!current()) return;
    items = list;
    policies = Object.fromEntries(pols.map((p) => [p.id, p.name]));
    // The states the items are in (and the one a card asked for).
    const states = [...new Set([...items.map((i) => i.state_name), params.get("state")].filter(Boolean))].sort();
    if (states.join() !== stateOptions) {
      const chosen = stateOptions ? state.value : params.get("state") || "";
      stateOptions = states.join();
      fill(state, h("option", { value: "" }, "any"), states.map((x) => h("option", { value: x }, x.replaceAll("_", " "))));
      state.value = chosen;
    }
    draw();
  };
}

async function enableProtection() {
  try {
    const [machines, items, policies] = await Promise.all([api("GET", "/v1/machines"), api("GET", "/v1/items"), api("GET", "/v1/policies")]);
    // An unprotected item (disabled, or an enable that failed) leaves its machine free to protect again.
    const taken = new Set(items.filter((i) => i.state_name !== "unprotected").map((i) => i.machine));
    const free = machines.filter((m) => !taken.has(m.name));
    if (free.length === 0) { banner("No machine waits for protection: start a mobility agent on it first (it reports its disks)."); return; }
    if (policies.length === 0) { banner("There is no replication policy yet: create one under Policies first."); return; }
    const v = await dialog("Enable protection", [
      h("label", { for: "e-machine" }, "Machine", h("select", { id: "e-machine", name: "machine", required: true },
        free.map((m) => h("option", { value: m.name }, `${m.name} (${m.disks.length} disk${m.disks.length === 1 ? "" : "s"}, ${bytes(m.disks.reduce((a, d) => a + d.size, 0))})`)))),
      h("label", { for: "e-policy" }, "Policy", h("select", { id: "e-policy", name: "policy", required: true },
        policies.map((p) => h("option", { value: p.id }, `${p.name} (RPO ${duration(p.rpo_threshold_secs)}, retention ${p.retention_hours} h)`)))),
    ], "Enable protection");
    if (v) run(() => api("POST", "/v1/items", { machine: v.machine, policy: v.policy }));
  } catch (e) { banner(e.message); }
}

// ---- One item: disks, RPO, recovery points and actions ---------------------------------------------

function itemPage(main, id) {
  const head = h("div", {});
  const summary = h("div", { class: "panel" });
  const disks = h("div", { class: "panel scroll" });
  const actions = h("div", { class: "actions", id: "item-actions" });
  const rpo = h("div", { class: "chart panel" });
  const points = h("div", { class: "panel", id: "points" });
  main.append(head,
    h("div", { class: "grid2" }, h("section", {}, h("h2", {}, "Status"), summary), h("section", {}, h("h2", {}, "RPO over the last hour"), rpo)),
    h("section", {}, h("h2", {}, "Disks"), disks),
    h("section", {}, h("h2", {}, "Recovery points"), points),
    h("section", {}, h("h2", {}, "Actions"), actions));
  const picker = timelinePicker(points);
  let lastRpo = -1;
  let lastActions = "";
  // The item as last read: the action buttons read it when clicked, not when they were drawn.
  let latest = null;
  return async (current) => {
    const [item, machines, hist, policies] = await Promise.all([
      api("GET", `/v1/items/${id}`), api("GET", "/v1/machines"), api("GET", `/v1/items/${id}/history`), api("GET", "/v1/policies")]);
    if (!current()) return;
    const policy = policies.find((p) => p.id === item.policy);
    fill(head, h("h1", {}, `${item.machine} `, stateBadge(item.state_name)));
    const m = machines.find((x) => x.name === item.machine);
    const pct = item.state.percent;
    fill(summary, h("dl", { class: "kv" },
      h("dt", {}, "Item"), h("dd", {}, item.id),
      h("dt", {}, "State"), h("dd", {}, item.state_name.replaceAll("_", " "), pct !== undefined ? ` (${pct}%)` : "",
        item.state.direction ? `, ${item.state.direction}` : ""),
      pct !== undefined && [h("dt", {}, "Progress"), h("dd", {}, h("progress", { max: 100, value: pct, "aria-label": "progress" }), ` ${pct}%`)],
      item.state.reason && [h("dt", {}, "Reason"), h("dd", { class: "s-bad" }, item.state.reason)],
      item.problem && [h("dt", {}, "Problem"), h("dd", { class: "s-bad" }, item.problem)],
      h("dt", {}, "RPO"), h("dd", { class: item.rpo_alert ? "s-bad" : "" }, duration(item.rpo_seconds), policy ? ` (threshold ${duration(policy.rpo_threshold_secs)})` : ""),
      h("dt", {}, "Policy"), h("dd", {}, policy ? policy.name : item.policy),
      h("dt", {}, "Process server"), h("dd", {}, item.process_server || "—"),
      h("dt", {}, "Master target"), h("dd", {}, item.master_target || "—"),
      item.job && [h("dt", {}, "Last job"), h("dd", {}, h("a", { href: `#/jobs/${item.job}` }, `job ${item.job}`))],
      item.test_failover && [h("dt", {}, "Test failover"), h("dd", {}, `view ${item.test_failover.view}: `,
        item.test_failover.machine.disks.map((d) => h("div", {}, h("code", {}, d.uri || d.path || d.name))))],
      item.failover && [h("dt", {}, "Failover"), h("dd", {}, item.failover.planned ? "planned" : "unplanned", item.failover.failback ? " (failback)" : "")]));
    const progress = new Map(((m && m.progress) || []).map((p) => [p.id, p]));
    fill(disks, !m ? h("p", { class: "muted" }, "The machine's agent has not reported.") :
      h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Disk"), h("th", {}, "Size"), h("th", {}, "Initial copy"), h("th", {}, "Changes captured"),
        h("th", {}, "Journal"), h("th", {}, "Awaiting resync"), h("th", {}, "Resync compare"))),
      h("tbody", {}, m.disks.map((d) => {
        const p = progress.get(d.id) || {};
        return h("tr", {},
          h("td", {}, d.name), h("td", {}, bytes(d.size)),
          h("td", {}, p.copy_done ? "done" : h("span", {}, h("progress", { max: 100, value: p.copy_percent || 0, "aria-label": `disk ${d.name} copy` }), ` ${Math.floor(p.copy_percent || 0)}%`)),
          h("td", {}, p.last_seq === undefined ? "—" : p.last_seq),
          h("td", {}, journalCell(p)),
          h("td", {}, p.dirty_bytes ? bytes(p.dirty_bytes) + (p.resync_waiting ? " (waits for the resync window)" : "") : "none"),
          h("td", {}, p.resync_active ? `${Math.floor(p.compare_percent)}%` : "—"));
      }))));
    const last = hist.length ? hist[hist.length - 1].time : 0;
    if (last !== lastRpo) {
      lastRpo = last;
      chart(rpo, "", "RPO", hist.map((s) => s.time), hist.map((s) => s.rpo_secs), duration);
    }
    if (item.master_target && !["unprotected", "enabling_protection"].includes(item.state_name)) {
      try { picker.update(await api("GET", `/v1/items/${id}/points`)); } catch (e) { picker.error(e.message); }
    } else picker.error("No recovery points yet: they start with initial replication.");
    const key = JSON.stringify([item.actions, me.role]);
    latest = item;
    if (key !== lastActions) { lastActions = key; fill(actions, itemActions(() => latest, picker)); }
  };
}

function journalCell(p) {
  if (p.journal_limit_bytes) {
    const used = p.journal_bytes || 0;
    const pct = Math.round((100 * used) / p.journal_limit_bytes);
    return h("span", { title: `${bytes(used)} of ${bytes(p.journal_limit_bytes)}` }, h("progress", { max: 100, value: pct, "aria-label": "journal used" }),
      ` ${bytes(Math.max(0, p.journal_limit_bytes - used))} free`, p.overflow ? h("span", { class: "s-warn" }, " (over its limit: tracking in the dirty map)") : "");
  }
  return p.overflow ? h("span", { class: "s-warn" }, "over its limit") : "within its limit";
}

// The retained range of an item's recovery points on a time axis, with its named points and the
// windows where no crash-consistent point exists; any instant in the range can be chosen with the
// slider, the date field, a click on the chart, or a named point.
function timelinePicker(el) {
  const status = h("p", { class: "muted", id: "tl-status" });
  const chartEl = h("div", { class: "timeline", id: "timeline" });
  const slider = h("input", { type: "range", id: "tl-slider", min: 0, max: 0, step: 1, value: 0, "aria-label": "recovery instant" });
  const chosen = h("output", { id: "tl-chosen", for: "tl-slider" }, "latest");
  const named = h("div", { class: "actions", id: "tl-named" });
  const typed = h("input", { type: "text", id: "tl-typed", placeholder: "2026-12-04 15:30:12", size: 24 });
  let range = null; // [oldest_us, latest_us]
  let choice = { spec: "latest", label: "latest" };
  let u = null;
  let windows = [];
  let sig = "";
  const setInstant = (us, label) => {
    if (!range) return;
    us = Math.max(range[0], Math.min(range[1], Math.round(us)));
    choice = { spec: { "time-us": us }, label: label || whenUs(us) };
    slider.value = String(Math.round((us - range[0]) / 1e6));
    fill(chosen, choice.label);
    if (u) u.redraw(false);
  };
  slider.addEventListener("input", () => { if (range) setInstant(range[0] + Number(slider.value) * 1e6); });
  // No range any more (the points expired, or the master target did not answer): no chart to redraw.
  const forget = () => { range = null; dropChart(chartEl); chartEl.replaceChildren(); u = null; sig = ""; };
  const takeTyped = () => {
    const us = parseInstantUs(typed.value);
    if (us === null) { banner(`"${typed.value}" is not an instant: write it as 2026-12-04 15:30:12 (UTC) or with a zone.`); return; }
    if (!range || us < range[0] || us > range[1]) { banner(`${whenUs(us)} is outside the retained range${range ? ` (${whenUs(range[0])} to ${whenUs(range[1])})` : ""}.`); return; }
    banner(null);
    setInstant(us);
  };
  typed.addEventListener("change", takeTyped);
  typed.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); takeTyped(); } });
  const pickBtn = (label, spec) => h("button", { type: "button", onclick: () => { choice = { spec, label }; fill(chosen, label); if (u) u.redraw(false); } }, label);
  // Choosing an instant is for acting on it: readers see the range and the named points only.
  const chooser = canOperate();
  el.append(status, chartEl, chooser && h("div", { class: "picker" }, h("label", { for: "tl-slider", class: "grow" }, "Instant", slider), h("label", { for: "tl-typed" }, "Or type it (UTC)", typed), h("div", {}, "Chosen: ", chosen)),
    chooser && h("div", { class: "actions" }, pickBtn("Latest", "latest"), pickBtn("Latest app-consistent", "latest-app-consistent"), pickBtn("Latest bookmark", "latest-bookmark")),
    named);
  return {
    choice: () => choice,
    error(msg) { fill(status, msg); forget(); },
    update(p) {
      const disks = p.disks || [];
      const withRange = disks.filter((d) => d.oldest_us !== null && d.latest_us !== null);
      if (withRange.length === 0) { fill(status, "No recovery point yet."); forget(); return; }
      range = [Math.max(...withRange.map((d) => d.oldest_us)), Math.min(...withRange.map((d) => d.latest_us))];
      // Retention moves the range on: a chosen instant that fell out of it is the oldest one left.
      if (choice.spec["time-us"] !== undefined && choice.spec["time-us"] < range[0]) setInstant(range[0]);
      // A window without a beginning began before the oldest retained point.
      windows = disks.flatMap((d) => d.inconsistent || []).map((w) => [
        w.begin_time ? Date.parse(w.begin_time) / 1000 : range[0] / 1e6,
        w.end_time ? Date.parse(w.end_time) / 1000 : range[1] / 1e6]);
      // The points an operator may choose (not a window's edges or the end of the initial copy).
      const marks = (disks[0].named || []).filter((mk) => mk.kind === "app-consistent" || mk.kind === "crash-consistent");
      const undo = disks.reduce((a, d) => a + (d.undo_bytes || 0), 0);
      fill(status, `Retained: ${whenUs(range[0])} to ${whenUs(range[1])} (${duration((range[1] - range[0]) / 1e6)}), ${marks.length} named points, ${bytes(undo)} of undo data.`);
      slider.max = String(Math.max(0, Math.round((range[1] - range[0]) / 1e6)));
      if (choice.spec === "latest") slider.value = slider.max;
      const newSig = JSON.stringify([range, marks.length, windows.length]);
      if (newSig === sig) return;
      sig = newSig;
      const markLabel = (mk) => `${mk.kind}${mk.tag ? `: ${mk.tag}` : ""} ${whenUs(mk.at_us).slice(11, 19)}`;
      const recent = marks.slice(-12).reverse();
      fill(named, chooser ? recent.map((mk) => h("button", { type: "button", title: `${mk.kind} at ${mk.time}`,
        onclick: () => setInstant(mk.at_us, `${mk.tag || mk.kind} (${whenUs(mk.at_us)})`) }, markLabel(mk)))
        : h("ul", {}, recent.map((mk) => h("li", {}, markLabel(mk)))));
      if (!window.uPlot) return;
      const xs = [range[0] / 1e6, ...marks.map((mk) => mk.at_us / 1e6).filter((x) => x >= range[0] / 1e6 && x <= range[1] / 1e6), range[1] / 1e6].sort((a, b) => a - b);
      const kinds = new Map(marks.map((mk) => [mk.at_us / 1e6, String(mk.kind).startsWith("app") ? 2 : 1]));
      const kindY = (x) => kinds.get(x) ?? null;
      dropChart(chartEl);
      chartEl.replaceChildren();
      u = new uPlot({
        width: Math.max(200, chartEl.clientWidth || 600), height: 120,
        legend: { show: false },
        tzDate: utc,
        cursor: { y: false },
        scales: { x: { time: true }, y: { range: [0, 3] } },
        axes: [{}, { show: false }],
        series: [{}, { label: "named point", stroke: "#0b5cad", paths: () => null, points: { show: true, size: 9, fill: "#0b5cad" } }],
        hooks: {
          drawClear: [(uu) => {
            const ctx = uu.ctx;
            const top = uu.bbox.top; const hgt = uu.bbox.height;
            ctx.save();
            ctx.fillStyle = "#d0e7ff";
            const l = uu.valToPos(range[0] / 1e6, "x", true); const r = uu.valToPos(range[1] / 1e6, "x", true);
            ctx.fillRect(l, top + hgt * 0.35, Math.max(2, r - l), hgt * 0.3);
            ctx.fillStyle = "#cf222e55";
            for (const [a, b] of windows) { const wa = uu.valToPos(a, "x", true); const wb = uu.valToPos(b, "x", true); ctx.fillRect(wa, top, Math.max(2, wb - wa), hgt); }
            ctx.restore();
          }],
          draw: [(uu) => {
            const at = choice.spec === "latest" ? range[1] / 1e6 : choice.spec["time-us"] ? choice.spec["time-us"] / 1e6 : null;
            if (at === null) return;
            const x = uu.valToPos(at, "x", true);
            const ctx = uu.ctx;
            ctx.save(); ctx.strokeStyle = "#f59e0b"; ctx.lineWidth = 3;
            ctx.beginPath(); ctx.moveTo(x, uu.bbox.top); ctx.lineTo(x, uu.bbox.top + uu.bbox.height); ctx.stroke(); ctx.restore();
          }],
          ready: [(uu) => {
            uu.over.addEventListener("click", () => { const left = uu.cursor.left; if (left >= 0) setInstant(uu.posToVal(left, "x") * 1e6); });
          }],
        },
      }, [xs, xs.map(kindY)], chartEl);
      charts.set(chartEl, u);
    },
  };
}

// The buttons for what the item allows now (`actions`, decided by the server the way its handlers
// decide), each confirmed and followed to its job.
function itemActions(get, picker) {
  if (!canOperate()) return [h("p", { class: "muted" }, `Your token (${me.role}) may look but not act.`)];
  const item = get();
  const id = item.id;
  const at = () => picker.choice();
  const ACTIONS = {
    "test-failover": ["Test failover", "primary", () => act("Test failover", `Bring up item ${id}'s disks at ${at().label} as writable test disks on the recovery site. Replication goes on; the test's writes go to overlays and never reach the replica.`, "Start test failover", () => api("POST", `/v1/items/${id}/test-failover`, { point: at().spec }))],
    "test-failover-cleanup": ["Clean up test failover", "primary", () => act("Clean up test failover", `Delete the test disks of item ${id} (${(get().test_failover || {}).view}) and what was written to them.`, "Clean up", () => api("POST", `/v1/items/${id}/test-failover/cleanup`))],
    "planned-failover": ["Planned failover", "danger", () => act("Planned failover", `Stop ${item.machine}, ship everything its journal holds, and bring it up on the ${item.state.direction === "reverse" ? "primary" : "recovery"} site with no data loss.`, "Fail over", () => api("POST", `/v1/items/${id}/failover`, { planned: true }), true)],
    "unplanned-failover": ["Unplanned failover", "danger", () => act("Unplanned failover", `Cut off the source of ${item.machine} and bring it up on the other site at ${at().label}. Changes after that point are not in the replica.`, "Fail over", () => api("POST", `/v1/items/${id}/failover`, { planned: false, point: at().spec }), true)],
    "failback": ["Fail back", "danger", () => act("Fail back", `Stop ${item.machine} on the recovery site, ship what it wrote back to the primary site, and bring it up there.`, "Fail back", () => api("POST", `/v1/items/${id}/failback`), true)],
    "change-point": ["Change recovery point", "", () => act("Change recovery point", `Bring the failed-over disks of item ${id} to ${at().label} instead. Writes made on them since the failover are discarded.`, "Change point", () => api("POST", `/v1/items/${id}/failover/point`, { point: at().spec }), true)],
    "commit": ["Commit", "primary", () => act("Commit failover", `Make the failover of item ${id} final: its recovery points are deleted and the point can no longer change.`, "Commit", () => api("POST", `/v1/items/${id}/commit`), true)],
    "reprotect": ["Reprotect", "primary", () => act("Reprotect", `Replicate ${item.machine} from the primary site to the recovery site again (only what differs is shipped).`, "Reprotect", () => api("POST", `/v1/items/${id}/reprotect`, {}))],
    "reprotect-naming-machine": ["Reprotect", "primary", () => reprotect(get())],
    "resync": ["Resync", "", () => act("Resync", `Compare checksums of ${item.machine}'s disks and their replicas and ship what differs.`, "Resync", () => api("POST", `/v1/items/${id}/resync`))],
    "full-resync": ["Full resync", "", () => act("Full resync", `Copy ${item.machine}'s disks whole into a new replica. Its recovery points stay until they expire; new ones start when the copy is done.`, "Full resync", () => api("POST", `/v1/items/${id}/resync?full=true`), true)],
    "move": ["Move to another process server", "", () => moveItem(get())],
    "disable": ["Disable protection", "danger", () => act("Disable protection", `Stop replicating ${item.machine} and delete its replica and recovery points on the recovery site. The source disk is not touched.`, "Disable", () => api("DELETE", `/v1/items/${id}`), true)],
  };
  const out = (item.actions || []).filter((a) => ACTIONS[a]).map((a) => {
    const [label, cls, fn] = ACTIONS[a];
    return h("button", { type: "button", class: cls, "data-action": a, onclick: fn }, label);
  });
  return out.length ? out : [h("p", { class: "muted" }, `Nothing can be done while the item is ${item.state_name.replaceAll("_", " ")}: wait for its job.`)];
}

async function moveItem(item) {
  const comps = await api("GET", "/v1/components").catch((e) => { banner(e.message); return null; });
  if (!comps) return;
  const ps = comps.filter((c) => c.role === "process-server" && c.health === "healthy" && !c.draining && c.name !== item.process_server);
  const v = await dialog("Move to another process server", [h("label", { for: "mv-ps" }, "Process server", h("select", { id: "mv-ps", name: "ps" },
    h("option", { value: "" }, "the least busy"), ps.map((c) => h("option", { value: c.name }, c.name))))], "Move");
  if (v) run(() => api("POST", `/v1/items/${item.id}/move`, v.ps ? { process_server: v.ps } : {}));
}

// After a committed failover, the machine that now runs the failed-over disks (on the other site)
// replicates them back: its agent must be named.
async function reprotect(item) {
  const machines = await api("GET", "/v1/machines").catch((e) => { banner(e.message); return null; });
  if (!machines) return;
  const others = machines.filter((m) => m.name !== item.machine);
  if (others.length === 0) { banner(`No other machine has reported: start a mobility agent in front of the failed-over disks of ${item.machine} (srctl failover printed where they are), then reprotect.`); return; }
  const v = await dialog("Reprotect", [
    h("p", {}, `Replicate the failed-over disks of ${item.machine} back to the other site. Only blocks that differ are shipped.`),
    h("label", { for: "rp-machine" }, "Machine fronting the failed-over disks", h("select", { id: "rp-machine", name: "machine", required: true },
      others.map((m) => h("option", { value: m.name }, `${m.name} (${m.disks.map((d) => d.path || d.name).join(", ")})`)))),
  ], "Reprotect");
  if (v) run(() => api("POST", `/v1/items/${item.id}/reprotect`, { machine: v.machine }));
}

// ---- Jobs ------------------------------------------------------------------------------------------

function jobsPage(main) {
  const state = h("select", { id: "j-state" }, ["", "running", "succeeded", "failed"].map((s) => h("option", { value: s }, s || "any")));
  const kind = h("input", { id: "j-kind", type: "search", placeholder: "e.g. test failover" });
  const table = h("div", { class: "panel scroll", id: "jobs" });
  main.append(h("h1", {}, "Jobs"), h("div", { class: "filters" }, h("label", { for: "j-state" }, "State", state), h("label", { for: "j-kind" }, "Kind", kind)), table);
  const refresh = async (current) => {
    const q = new URLSearchParams({ limit: "200" });
    if (state.value) q.set("state", state.value);
    if (kind.value.trim()) q.set("kind", kind.value.trim());
    const jobs = await api("GET", `/v1/jobs?${q}`);
    if (!current()) return;
    jobs.reverse();
    fill(table, jobs.length === 0 ? h("p", { class: "muted" }, "No job matches.") : h("table", {}, h("thead", {}, h("tr", {},
      h("th", {}, "Job"), h("th", {}, "Kind"), h("th", {}, "Target"), h("th", {}, "State"), h("th", {}, "Progress"), h("th", {}, "Started"), h("th", {}, "Took"), h("th", {}, "Error"))),
    h("tbody", {}, jobs.map((j) => h("tr", {},
      h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)), h("td", {}, j.kind), h("td", {}, jobTarget(j)), h("td", {}, stateBadge(j.state)),
      h("td", {}, `${j.progress}%`), h("td", {}, when(j.started)), h("td", {}, j.ended ? duration(j.ended - j.started) : "—"),
      h("td", { class: "wrap s-bad" }, j.error || ""))))));
  };
  state.addEventListener("change", () => refreshNow());
  kind.addEventListener("change", () => refreshNow());
  return refresh;
}

function jobPage(main, id) {
  const head = h("div", {});
  const body = h("div", { class: "panel" });
  main.append(head, body);
  return async (current) => {
    const j = await api("GET", `/v1/jobs/${id}`);
    if (!current()) return;
    fill(head, h("h1", {}, `Job ${j.id}: ${j.kind} `, stateBadge(j.state)));
    fill(body, h("dl", { class: "kv" },
      h("dt", {}, "Target"), h("dd", {}, jobTarget(j)),
      h("dt", {}, "Progress"), h("dd", {}, h("progress", { max: 100, value: j.progress, "aria-label": "job progress", id: "job-progress" }), ` ${j.progress}%`),
      h("dt", {}, "Started"), h("dd", {}, when(j.started)),
      h("dt", {}, "Ended"), h("dd", {}, j.ended ? `${when(j.ended)} (took ${duration(j.ended - j.started)})` : "running"),
      j.error && [h("dt", {}, "Error"), h("dd", { class: "s-bad", id: "job-error" }, j.error)]),
    h("h2", {}, "Steps"),
    h("ol", { class: "steps", id: "job-steps" }, j.steps.map((s) => h("li", { "data-state": s.state },
      stateBadge(s.state), h("span", {}, s.name),
      h("span", { class: "muted" }, s.started ? (s.ended ? `took ${duration(s.ended - s.started)}` : `running for ${duration(Date.now() / 1000 - s.started)}`) : "waiting")))));
  };
}

// A job's target: an item (by id), a recovery plan, or a component by name.
function jobTarget(j) {
  if (j.kind.startsWith("plan ")) return `plan ${j.target}`;
  if (/^\d+$/.test(j.target)) return h("a", { href: `#/items/${j.target}` }, `item ${j.target}`);
  return j.target;
}

// ---- Events ----------------------------------------------------------------------------------------

function eventsPage(main) {
  const table = h("div", { class: "panel scroll" });
  main.append(h("h1", {}, "Events"), table);
  return async (current) => {
    const ev = await api("GET", "/v1/events?limit=200");
    if (!current()) return;
    ev.reverse();
    fill(table, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Time"), h("th", {}, "Severity"), h("th", {}, "Subject"), h("th", {}, "Message"))),
      h("tbody", {}, ev.map((e) => h("tr", {}, h("td", {}, when(e.time)), h("td", { class: `sev-${e.severity}` }, e.severity), h("td", {}, e.subject), h("td", { class: "wrap" }, e.message))))));
  };
}

// ---- Policies --------------------------------------------------------------------------------------

function policiesPage(main) {
  const table = h("div", { class: "panel scroll" });
  const create = canOperate() && h("button", { type: "button", class: "primary", onclick: async () => {
    const num = (name, label, value) => h("label", { for: `p-${name}` }, label, h("input", { id: `p-${name}`, name, type: "number", min: 0, value, required: true }));
    const v = await dialog("New replication policy", [
      h("label", { for: "p-name" }, "Name", h("input", { id: "p-name", name: "name", required: true, maxlength: 64 })),
      num("rpo_threshold_secs", "RPO threshold (seconds)", 300), num("retention_hours", "Retention (hours)", 24),
      num("crash_consistent_interval_secs", "Crash-consistent point every (seconds)", 300), num("app_consistent_interval_secs", "App-consistent point every (seconds)", 3600),
    ], "Create");
    if (!v) return;
    const body = { name: v.name };
    for (const k of ["rpo_threshold_secs", "retention_hours", "crash_consistent_interval_secs", "app_consistent_interval_secs"]) body[k] = Number(v[k]);
    run(() => api("POST", "/v1/policies", body));
  } }, "New policy");
  main.append(h("h1", {}, "Replication policies"), h("div", { class: "actions" }, create), table);
  return async (current) => {
    const ps = await api("GET", "/v1/policies");
    if (!current()) return;
    fill(table, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "RPO threshold"), h("th", {}, "Retention"), h("th", {}, "Crash-consistent"), h("th", {}, "App-consistent"), h("th", {}, "Compression"), h("th", {}, "Bandwidth"), canOperate() && h("th", {}, "Actions"))),
      h("tbody", {}, ps.map((p) => h("tr", {}, h("td", {}, p.name), h("td", {}, duration(p.rpo_threshold_secs)), h("td", {}, `${p.retention_hours} h`),
        h("td", {}, `every ${duration(p.crash_consistent_interval_secs)}`), h("td", {}, p.app_consistent_interval_secs ? `every ${duration(p.app_consistent_interval_secs)}` : "off"),
        h("td", {}, p.compression_level), h("td", {}, p.bandwidth_limit_mbps ? `${p.bandwidth_limit_mbps} Mbit/s` : "unlimited"),
        canOperate() && h("td", {}, h("button", { type: "button", class: "danger", "data-key": p.id, onclick: () => act(`Delete policy ${p.name}`, "Only a policy no item uses can be deleted.", "Delete", () => api("DELETE", `/v1/policies/${encodeURIComponent(p.id)}`), true) }, "Delete")))))));
  };
}

// ---- Recovery plans --------------------------------------------------------------------------------

function plansPage(main) {
  const table = h("div", { class: "panel scroll" });
  const create = canOperate() && h("button", { type: "button", class: "primary", onclick: async () => {
    const v = await dialog("New recovery plan", [
      h("label", { for: "rp-name" }, "Name", h("input", { id: "rp-name", name: "name", required: true, maxlength: 128 })),
      h("label", { for: "rp-groups" }, "Groups: one line per group, item ids separated by commas (groups fail over in order)",
        h("textarea", { id: "rp-groups", name: "groups", rows: 4, required: true, placeholder: "1, 2\n3" })),
    ], "Create");
    if (!v) return;
    const groups = v.groups.split("\n").map((l) => l.split(",").map((x) => x.trim()).filter(Boolean).map(Number)).filter((g) => g.length).map((items) => ({ items }));
    run(() => api("POST", "/v1/plans", { name: v.name, groups }));
  } }, "New plan");
  main.append(h("h1", {}, "Recovery plans"), h("div", { class: "actions" }, create), table);
  return async (current) => {
    const plans = await api("GET", "/v1/plans");
    if (!current()) return;
    fill(table, plans.length === 0 ? h("p", { class: "muted" }, "No recovery plan yet.") : h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Plan"), h("th", {}, "Groups"), h("th", {}, "Items"))),
      h("tbody", {}, plans.map((p) => h("tr", {}, h("td", {}, h("a", { href: `#/plans/${encodeURIComponent(p.id)}` }, p.name)), h("td", {}, p.groups.length),
        h("td", {}, p.groups.flatMap((g) => g.items).join(", ")))))));
  };
}

function planPage(main, id) {
  const head = h("div", {});
  const body = h("div", { class: "panel" });
  const actions = h("div", { class: "actions" });
  const jobs = h("div", { class: "panel scroll" });
  main.append(head, body, h("h2", {}, "Actions"), actions, h("h2", {}, "Its jobs"), jobs);
  let drawn = false;
  return async (current) => {
    const p = await api("GET", `/v1/plans/${encodeURIComponent(id)}`);
    // A plan's jobs name it as their target.
    const js = await api("GET", `/v1/jobs?target=${encodeURIComponent(p.name)}&limit=20`);
    if (!current()) return;
    fill(head, h("h1", {}, `Recovery plan ${p.name}`));
    fill(body, h("ol", {}, p.groups.map((g, i) => h("li", {}, `Group ${i + 1}: items `, g.items.map((it, k) => [k ? ", " : "", h("a", { href: `#/items/${it}` }, it)]),
      (g.pre || []).length ? ` — before: ${g.pre.map(planAction).join("; ")}` : "", (g.post || []).length ? ` — after: ${g.post.map(planAction).join("; ")}` : ""))));
    js.reverse();
    fill(jobs, js.length === 0 ? h("p", { class: "muted" }, "Not run yet.") : h("ul", {}, js.map((j) => h("li", {}, h("a", { href: `#/jobs/${j.id}` }, `job ${j.id}`), ` ${j.kind} `, stateBadge(j.state), ` ${j.progress}%`))));
    if (drawn) return;
    drawn = true;
    if (!canOperate()) { fill(actions, h("p", { class: "muted" }, `Your token (${me.role}) may look but not act.`)); return; }
    // Scripts run on the configuration server's host: a plan with any is run by an admin only.
    const scripted = p.groups.some((g) => [...(g.pre || []), ...(g.post || [])].some((a) => a.script));
    const mayRun = !scripted || isAdmin();
    const runPlan = (kind, label, danger) => h("button", { type: "button", class: danger ? "danger" : "primary", onclick: () =>
      act(`${label}: ${p.name}`, `Run the plan's ${kind.replaceAll("-", " ")}: its groups in order, each group's items together, with its manual actions waiting for Resume.`, label, () => api("POST", `/v1/plans/${encodeURIComponent(id)}/failover`, { kind }), danger) }, label);
    fill(actions, mayRun ? [runPlan("test", "Test failover"), runPlan("planned", "Planned failover", true), runPlan("unplanned", "Unplanned failover", true)]
      : h("p", { class: "muted" }, "This plan runs scripts on the configuration server's host: only an admin may run it."),
      h("button", { type: "button", onclick: () => act("Resume plan", "Go on past the manual action the plan waits at.", "Resume", () => api("POST", `/v1/plans/${encodeURIComponent(id)}/resume`)) }, "Resume"),
      h("button", { type: "button", onclick: () => act("Consistency point", "Take a crash-consistent point across all the plan's items at one instant.", "Take point", () => api("POST", `/v1/plans/${encodeURIComponent(id)}/consistency-point`)) }, "Take consistency point"),
      h("button", { type: "button", class: "danger", onclick: () => act(`Delete plan ${p.name}`, "The items stay protected.", "Delete", async () => { const r = await api("DELETE", `/v1/plans/${encodeURIComponent(id)}`); location.hash = "#/plans"; return r; }, true) }, "Delete"));
  };
}

function planAction(a) {
  if (a.manual) return `manual: ${a.manual.instruction}`;
  if (a.script) return `script: ${a.script.command}`;
  return JSON.stringify(a);
}

// ---- Infrastructure --------------------------------------------------------------------------------

function infraPage(main) {
  const table = h("div", { class: "panel scroll", id: "infra" });
  const tools = h("div", { class: "actions" });
  if (canOperate()) tools.append(h("button", { type: "button", onclick: () => act("Balance process servers", "Move items from the busiest process servers to the least busy ones (one job per move).", "Balance", () => api("POST", "/v1/process-servers/balance")) }, "Balance process servers"));
  if (isAdmin()) {
    tools.append(h("button", { type: "button", onclick: async () => {
      const v = await dialog("New registration key", [
        h("label", { for: "k-role" }, "For a", h("select", { id: "k-role", name: "role" }, ["agent", "process-server", "master-target"].map((r) => h("option", { value: r }, r)))),
        h("label", { for: "k-ttl" }, "Valid for (hours)", h("input", { id: "k-ttl", name: "ttl", type: "number", min: 1, max: 720, value: 24, required: true })),
      ], "Create key");
      if (!v) return;
      try {
        const k = await api("POST", "/v1/registration-keys", { role: v.role, ttl_seconds: Number(v.ttl) * 3600 });
        await dialog("Registration key", [h("p", {}, "Shown once: give it to the component's --registration-key (it works once)."), h("p", { class: "secret" }, k.key || JSON.stringify(k))], "Done", false, true);
      } catch (e) { banner(e.message); }
    } }, "New registration key"));
    tools.append(h("button", { type: "button", onclick: async () => {
      const v = await dialog("New API token", [
        h("label", { for: "t-name" }, "Name", h("input", { id: "t-name", name: "name", required: true, maxlength: 64 })),
        h("label", { for: "t-role" }, "Role", h("select", { id: "t-role", name: "role" }, ["reader", "operator", "admin"].map((r) => h("option", { value: r }, r)))),
      ], "Create token");
      if (!v) return;
      try {
        const t = await api("POST", "/v1/tokens", { name: v.name, role: v.role });
        await dialog("API token", [h("p", {}, "Shown once: keep it in a file only its user can read."), h("p", { class: "secret" }, t.token || JSON.stringify(t))], "Done", false, true);
      } catch (e) { banner(e.message); }
    } }, "New API token"));
  }
  const agentsNote = h("p", { class: "muted", id: "agents-count" });
  const agentsText = h("input", { id: "a-text", type: "search", placeholder: "machine name" });
  const agents = h("div", { class: "panel scroll", id: "agents" });
  main.append(h("h1", {}, "Infrastructure"), tools, h("h2", {}, "Process servers and master targets"), table,
    h("h2", {}, "Mobility agents"), h("div", { class: "filters" }, h("label", { for: "a-text" }, "Search", agentsText)), agentsNote, agents);
  let last = null;
  const drawAgents = () => {
    if (!last) return;
    const [o, comps] = last;
    const t = agentsText.value.trim().toLowerCase();
    const list = comps.filter((c) => c.role === "agent" && (!t || c.name.toLowerCase().includes(t)));
    const shown = list.slice(0, ROWS);
    fill(agentsNote, `${o.agents.up} of ${o.agents.total} agents reported within ${duration(o.component_timeout_secs)}` +
      (shown.length < list.length ? `; the first ${shown.length} of ${list.length} shown: search for the others.` : "."));
    fill(agents, shown.length === 0 ? h("p", { class: "muted" }, "None.") : h("table", {}, h("thead", {}, h("tr", {},
      h("th", {}, "Machine"), h("th", {}, "Health"), h("th", {}, "Last heartbeat"), h("th", {}, "Churn"), isAdmin() && h("th", {}, "Actions"))),
    h("tbody", {}, shown.map((c) => {
      const age = c.last_heartbeat ? o.now - c.last_heartbeat : null;
      const up = c.health === "healthy";
      return h("tr", {}, h("td", {}, c.name),
        h("td", {}, h("span", { class: `state ${up ? "s-ok" : c.revoked ? "s-warn" : "s-bad"}` }, c.health)),
        h("td", {}, age === null ? "never" : `${duration(age)} ago`), h("td", {}, `${bytes((c.load || {}).churn_bytes_per_sec || 0)}/s`),
        isAdmin() && h("td", {}, componentActions({ ...c, up })));
    }))));
  };
  agentsText.addEventListener("input", drawAgents);
  return async (current) => {
    const [o, comps] = await Promise.all([api("GET", "/v1/overview"), api("GET", "/v1/components")]);
    if (!current()) return;
    fill(table, o.components.length === 0 ? h("p", { class: "muted" }, "No process server or master target registered yet.") : componentTable(o.components, true));
    last = [o, comps];
    drawAgents();
  };
}

// ---- Network mappings ------------------------------------------------------------------------------

function networksPage(main) {
  const table = h("div", { class: "panel scroll" });
  const create = canOperate() && h("button", { type: "button", class: "primary", onclick: async () => {
    const field = (name, label, req) => h("label", { for: `n-${name}` }, label, h("input", { id: `n-${name}`, name, required: !!req }));
    const v = await dialog("New network mapping", [field("name", "Name", true), field("source", "Source network (CIDR)", true),
      field("target", "Target network (CIDR)", true), field("target_network", "Target network name", true), field("gateway", "Gateway (optional)")], "Create");
    if (!v) return;
    const body = { name: v.name, source: v.source, target: v.target, target_network: v.target_network };
    if (v.gateway) body.gateway = v.gateway;
    run(() => api("POST", "/v1/network-mappings", body));
  } }, "New mapping");
  main.append(h("h1", {}, "Network mappings"), h("div", { class: "actions" }, create), table);
  return async (current) => {
    const ms = await api("GET", "/v1/network-mappings");
    if (!current()) return;
    fill(table, ms.length === 0 ? h("p", { class: "muted" }, "No network mapping: failed-over machines keep their addresses.") : h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Source"), h("th", {}, "Target"), h("th", {}, "Target network"), h("th", {}, "Gateway"), canOperate() && h("th", {}, "Actions"))),
      h("tbody", {}, ms.map((m) => h("tr", {}, h("td", {}, m.name), h("td", {}, m.source), h("td", {}, m.target), h("td", {}, m.target_network), h("td", {}, m.gateway || "—"),
        canOperate() && h("td", {}, h("button", { type: "button", class: "danger", "data-key": m.id, onclick: () => act(`Delete mapping ${m.name}`, "Failovers after this keep the source addresses for this network.", "Delete", () => api("DELETE", `/v1/network-mappings/${encodeURIComponent(m.id)}`), true) }, "Delete")))))));
  };
}

window.addEventListener("hashchange", () => { if (bannerSource !== "signout") banner(null); else bannerSource = null; route(); });
document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshNow(); });
window.addEventListener("DOMContentLoaded", () => {
  // The skip link moves the focus; it is not a page.
  document.querySelector(".skip").addEventListener("click", (ev) => { ev.preventDefault(); document.getElementById("main").focus(); });
  route();
});
