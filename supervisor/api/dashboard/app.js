// model-supervisor dashboard. Plain ES2020, no framework, no build step.
//
// Data: GET /api/v1/models/status, /api/v1/gpus, /api/v1/config/errors and /healthz, kept
// current by the server-sent events of /api/v1/events, read with fetch() so the bearer token
// can be sent (EventSource cannot send headers). GPUs are polled every 2 s unless `gpu` sample
// events arrive; those update the cards in place and a full fetch happens only when a GPU's
// processes change (and every 10 s as a safety net). Every string from the server reaches the DOM as text (textContent / text nodes),
// never as HTML: model names, reasons and log lines come from users and processes.
"use strict";

const TOKEN_KEY = "model-supervisor.token";
const GPU_POLL_MS = 2000;
const STATUS_GAP_MS = 250;      // at most one status fetch per this, however many events arrive
const HEALTH_EVERY_MS = 10000;  // re-read /healthz this often while there are no GPUs
const GPU_FULL_EVERY_MS = 10000; // a full /api/v1/gpus this often even while samples arrive as events
const MAX_LOG_LINES = 5000;
const RETRY_MAX_MS = 30000;

const $ = (sel) => document.querySelector(sel);

/** Build an element. Strings and numbers become text nodes: nothing is parsed as HTML. */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function setText(el, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (el.textContent !== value) el.textContent = value;
}

function setAttr(el, name, value) {
  if (value === null || value === undefined) el.removeAttribute(name);
  else if (el.getAttribute(name) !== String(value)) el.setAttribute(name, String(value));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- the API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : describeDetail(detail) || `HTTP ${status}`);
    this.status = status;
  }
}

function describeDetail(detail) {
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  return detail === undefined || detail === null ? "" : JSON.stringify(detail);
}

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let tokenAsked = null; // the open token form's promise: every call refused meanwhile waits on it

/** Ask for the token once, however many calls were refused together. */
function askToken(refused) {
  if (token !== refused) return Promise.resolve(); // another call already got a new one
  if (tokenAsked) return tokenAsked;
  tokenAsked = new Promise((resolve) => {
    const dialog = $("#token-dialog");
    const input = $("#token-input");
    $("#token-refused").hidden = !refused;
    input.value = "";
    dialog.addEventListener("close", function done() {
      dialog.removeEventListener("close", done);
      const given = input.value.trim();
      input.value = "";
      if (given) {
        token = given;
        sessionStorage.setItem(TOKEN_KEY, token);
      }
      tokenAsked = null;
      resolve();
    });
    dialog.showModal();
    input.focus();
  });
  return tokenAsked;
}

/**
 * Call the API. JSON in and out; `raw` returns the Response (for streams). A 401 asks for the
 * token and tries again; any other error status throws an ApiError with the server's detail.
 */
async function api(path, { method = "GET", body, signal, raw = false, headers = {} } = {}) {
  for (;;) {
    const sent = token;
    const all = { Accept: "application/json", ...headers };
    if (sent) all.Authorization = `Bearer ${sent}`;
    if (body !== undefined) all["Content-Type"] = "application/json";
    const res = await fetch(path, {
      method, signal, headers: all, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (res.status === 401) {
      await res.body?.cancel();
      await askToken(sent);
      continue;
    }
    if (raw && res.ok) return res;
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = text; }
    if (!res.ok) throw new ApiError(res.status, data && data.detail !== undefined ? data.detail : text);
    return data;
  }
}

/** Run `fn` now, or once more when it finishes if triggered meanwhile; never more often than `gap`. */
function refresher(fn, gap) {
  let timer = null;
  let busy = false;
  let again = false;
  let last = -Infinity;
  const run = async () => {
    timer = null;
    busy = true;
    again = false;
    last = performance.now();
    try {
      await fn();
    } catch (err) {
      problem(err);
    } finally {
      busy = false;
      if (again) trigger();
    }
  };
  function trigger() {
    if (busy) { again = true; return; }
    if (timer === null) timer = setTimeout(run, Math.max(0, last + gap - performance.now()));
  }
  return trigger;
}

// -- notices ---------------------------------------------------------------------------------

let lastProblem = "";

function notice(text, bad = false) {
  const el = h("div", { class: bad ? "notice bad" : "notice", role: bad ? "alert" : "status" }, text);
  el.addEventListener("click", () => el.remove());
  $("#notices").append(el);
  setTimeout(() => el.remove(), bad ? 10000 : 5000);
}

/** A failed background refresh: said once, not every two seconds. */
function problem(err) {
  const text = err instanceof ApiError ? `${err.status}: ${err.message}` : `cannot reach the supervisor (${err.message})`;
  if (text !== lastProblem) notice(text, true);
  lastProblem = text;
}

function errorText(err) {
  return err instanceof ApiError ? err.message : `cannot reach the supervisor (${err.message})`;
}

// -- instances -------------------------------------------------------------------------------

const instances = new Map(); // instance id -> {item, base (performance.now() when item.uptime was true)}
const rows = new Map();      // instance id -> <tr>
let firstRender = true;

const refreshStatus = refresher(async () => {
  const items = await api("/api/v1/models/status");
  const now = performance.now();
  instances.clear();
  for (const item of items) instances.set(item.instance_id, { item, base: now });
  lastProblem = "";
  renderInstances();
  if (firstRender) {
    firstRender = false;
    performance.mark("dashboard-ready");
    document.documentElement.dataset.ready = "true";
  }
}, STATUS_GAP_MS);

/** A transition shows at once; the status fetch it triggers brings the rest (pid, restarts). */
function applyTransition(ev) {
  recordTransition(ev);
  const known = instances.get(ev.instance);
  if (known && typeof ev.to === "string") {
    known.item = { ...known.item, state: ev.to, reason: ev.reason ?? known.item.reason };
    if (ev.to === "RUNNING") known.item.uptime = 0;
    else known.item.uptime = null;
    known.base = performance.now();
    updateRow(rows.get(ev.instance), known);
    renderCounts();
  }
  refreshStatus();
}

function uptimeOf(entry) {
  const { item, base } = entry;
  if (item.state !== "RUNNING" || item.uptime === null || item.uptime === undefined) return null;
  return item.uptime + (performance.now() - base) / 1000;
}

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400);
  const hh = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  if (d) return `${d}d ${pad(hh)}h`;
  if (hh) return `${hh}h ${pad(m)}m`;
  if (m) return `${m}m ${pad(s % 60)}s`;
  return `${s % 60}s`;
}

function renderInstances() {
  const body = $("#instances tbody");
  const seen = new Set();
  let previous = null;
  for (const [id, entry] of instances) {
    seen.add(id);
    let tr = rows.get(id);
    if (!tr) {
      tr = createRow(id);
      rows.set(id, tr);
    }
    updateRow(tr, entry);
    const expected = previous ? previous.nextSibling : body.firstChild;
    if (tr !== expected) body.insertBefore(tr, expected);
    previous = tr;
  }
  for (const [id, tr] of rows) {
    if (!seen.has(id)) {
      tr.remove();
      rows.delete(id);
    }
  }
  $("#instances").hidden = instances.size === 0;
  $("#instances-empty").hidden = instances.size !== 0;
  renderCounts();
}

function createRow(id) {
  const cell = (label, field, cls, ...content) => h("td", { "data-label": label, "data-field": field, class: cls }, ...content);
  const c = {
    model: h("span", { class: "sub" }),
    state: h("span", { class: "badge state" }),
    desired: h("span", { class: "sub" }),
    reason: h("span", {}),
    error: h("span", { class: "sub" }),
    restarts: cell("Restarts", "restarts", "num"),
    uptime: cell("Uptime", "uptime", "num"),
    port: cell("Port", "port", "num"),
    gpus: cell("GPUs", "gpus"),
    memory: cell("GPU memory", "gpu-memory", "num"),
  };
  const button = (action, label, title, onclick) =>
    h("button", { type: "button", class: "btn", "data-action": action, title, onclick }, label);
  const tr = h("tr", { "data-instance": id });
  c.start = button("start", "Start", "set enabled = true in conf.d/ and start every instance of the model",
    () => modelAction(tr, c.start, "enable", "start"));
  c.stop = button("stop", "Stop", "set enabled = false in conf.d/: stops every instance of the model",
    () => modelAction(tr, c.stop, "disable", "stop"));
  c.restart = button("restart", "Restart", "restart every instance of the model",
    () => modelAction(tr, c.restart, "restart", "restart"));
  c.stopGpu = button("stop-gpu", "Stop on GPU", "remove this GPU from the model's declaration in conf.d/",
    () => stopOnGpu(tr, c.stopGpu));
  c.logs = button("logs", "Logs", "follow this instance's log", () => openLogs(id));
  tr.append(
    cell("Instance", "instance", null, h("span", { class: "mono" }, id), c.model),
    cell("State", "state", null, c.state, c.desired),
    cell("Why", "reason", "reason", c.reason, c.error),
    c.restarts, c.uptime, c.port, c.gpus, c.memory,
    cell("Actions", "actions", null, h("div", { class: "actions" }, c.start, c.stop, c.restart, c.stopGpu, c.logs)),
  );
  tr.cells_ = c;
  return tr;
}

function updateRow(tr, entry) {
  if (!tr) return;
  const { item } = entry;
  const c = tr.cells_;
  tr.entry = entry;
  setText(c.model, `${item.model_name} · ${item.model_type}`);
  setText(c.state, item.state);
  setAttr(c.state, "data-state", item.state);
  setText(c.desired, item.desired && item.desired !== "running" ? (item.desired === "stopped" ? "disabled" : item.desired) : "");
  setText(c.reason, item.reason || "");
  const extra = item.state !== "RUNNING" ? item.last_error || item.last_exit || "" : "";
  setText(c.error, extra && extra !== item.reason ? extra : "");
  setText(c.restarts, item.restarts ?? 0);
  const up = uptimeOf(entry);
  setText(c.uptime, up === null ? "—" : duration(up));
  setText(c.port, item.port ?? "—");
  const gpus = item.gpu_ids || [];
  // Cluster mode: where it runs, e.g. "gpu-a: 1" (GPU ids are the node's).
  setText(c.gpus, `${item.node ? `${item.node}: ` : ""}${gpus.length ? gpus.join(", ") : "cpu"}`);
  setText(c.memory, gpus.length && item.gpu_memory_mib !== null && item.gpu_memory_mib !== undefined ? `${item.gpu_memory_mib} MiB` : "—");
  const wanted = item.desired === "running";
  const stopped = ["STOPPED", "EXITED", "FATAL"].includes(item.state);
  enable(c.start, !wanted || stopped);
  enable(c.stop, wanted || !["STOPPED", "EXITED"].includes(item.state));
  enable(c.restart, wanted);
  c.stopGpu.hidden = gpus.length === 0;
  if (gpus.length) setText(c.stopGpu, `Stop on GPU ${gpus[0]}`);
}

function enable(button, allowed) {
  const disabled = button.getAttribute("aria-busy") === "true" || !allowed;
  if (button.disabled !== disabled) button.disabled = disabled;
}

/** Run an action from a button: busy while it runs, its result as a notice. */
async function act(button, label, fn) {
  if (button.getAttribute("aria-busy") === "true") return;
  button.setAttribute("aria-busy", "true");
  button.disabled = true;
  try {
    const message = await fn();
    notice(message || `${label}: done`);
  } catch (err) {
    notice(`${label}: ${errorText(err)}`, true);
  } finally {
    button.removeAttribute("aria-busy");
    button.disabled = false;
    refreshStatus();
  }
}

function modelAction(tr, button, verb, label) {
  const model = tr.entry.item.model_name;
  return act(button, `${label} ${model}`, async () => {
    await api(`/api/v1/models/${encodeURIComponent(model)}/${verb}`, { method: "POST" });
  });
}

function stopOnGpu(tr, button) {
  const { model_name, gpu_ids, instance_id } = tr.entry.item;
  return act(button, `stop ${instance_id}`, async () => {
    await api("/api/v1/models/stop", { method: "POST", body: { model_name, gpu_id: gpu_ids[0], instance_id } });
    return `${instance_id} stopped; GPU ${gpu_ids[0]} removed from ${model_name}'s declaration`;
  });
}

function renderCounts() {
  const counts = {};
  for (const { item } of instances.values()) counts[item.state] = (counts[item.state] || 0) + 1;
  const badges = Object.keys(counts).sort().map((state) =>
    h("span", { class: "badge state", "data-state": state }, `${state} ${counts[state]}`));
  $("#counts").replaceChildren(...badges);
}

// -- GPUs ------------------------------------------------------------------------------------

const cards = new Map(); // gpu id -> card element
let gpuList = [];        // the last /api/v1/gpus answer, with the sample events merged in
let gpuFetchAt = -Infinity;
let gpuEventAt = -Infinity;
let health = null;
let healthAt = -Infinity;

async function loadHealth() {
  health = await api("/healthz");
  healthAt = performance.now();
  setText($("#version"), health.version ? `v${health.version}` : "");
  const warnings = health.warnings || [];
  $("#warnings").hidden = warnings.length === 0;
  $("#warnings").replaceChildren(...warnings.map((w) => h("li", {}, w)));
}

const refreshGpus = refresher(async () => {
  const gpus = await api("/api/v1/gpus");
  gpuFetchAt = performance.now();
  if (!gpus.length && performance.now() - healthAt > HEALTH_EVERY_MS) await loadHealth();
  gpuList = gpus;
  renderGpus(gpus);
}, 500);

const SAMPLE_FIELDS = ["memory_used", "memory_total", "utilization", "power_draw", "temperature"];

/** A `gpu` event (a summary of one sample): update the cards; fetch only what it cannot tell. */
function applyGpuSample(ev) {
  if (!Array.isArray(ev.gpus)) {
    refreshGpus();
    return;
  }
  gpuEventAt = performance.now();
  recordGpuSample(ev);
  // One event per machine: this one's (no node), or a cluster node's (ev.node).
  const local = gpuList.filter((g) => (g.node || null) === (ev.node || null));
  const known = new Map(local.map((g) => [g.id, g]));
  let changed = ev.gpus.length !== local.length;
  for (const sample of ev.gpus) {
    const gpu = known.get(sample.id);
    if (!gpu) {
      changed = true;
      continue;
    }
    const procs = gpu.processes || [];
    if (sample.processes !== procs.length
        || (sample.strays !== undefined && sample.strays !== procs.filter((p) => !p.instance_id).length)) changed = true;
    for (const field of SAMPLE_FIELDS) if (field in sample) gpu[field] = sample[field];
  }
  renderGpus(gpuList);
  if (changed) refreshGpus(); // a process came or went: the summary has no pids
}

/** A card's key: GPU ids repeat across cluster nodes. */
const gpuKey = (gpu) => (gpu.node ? `${gpu.node}:${gpu.id}` : String(gpu.id));

const mib = (n) => (n >= 1024 ? `${(n / 1024).toFixed(1)} GiB` : `${n} MiB`);
const num = (v, unit, digits = 0) => (v === null || v === undefined ? "—" : `${Number(v).toFixed(digits)} ${unit}`);

function renderGpus(gpus) {
  const badge = $("#gpu-source");
  const source = gpus.length ? gpus[0].source : health && health.gpu_source;
  badge.hidden = !source;
  setText(badge, gpus.some((g) => g.simulated) ? "simulated" : source || "");
  badge.classList.toggle("sim", gpus.some((g) => g.simulated));
  const empty = $("#gpus-empty");
  empty.hidden = gpus.length > 0;
  if (!gpus.length) {
    const reason = health && health.gpu_reason;
    setText(empty, reason ? `No GPUs: ${reason}` : "No GPUs.");
  }
  const box = $("#gpus");
  const seen = new Set();
  for (const gpu of gpus) {
    const key = gpuKey(gpu);
    seen.add(key);
    let card = cards.get(key);
    if (!card) {
      card = createCard(gpu.id, gpu.node);
      cards.set(key, card);
      box.append(card);
    }
    updateCard(card, gpu);
  }
  for (const [id, card] of cards) {
    if (!seen.has(id)) {
      card.remove();
      cards.delete(id);
    }
  }
}

function createCard(id, node) {
  const p = {
    node: node || null,
    name: h("span", { class: "muted" }),
    sim: h("span", { class: "badge sim", hidden: true }, "simulated"),
    fill: h("span", {}),
    memory: h("span", {}),
    power: h("span", {}),
    util: h("span", {}),
    temp: h("span", {}),
    errors: h("div", { class: "gpu-errors" }),
    procs: h("tbody", {}),
    rows: new Map(),
  };
  p.bar = h("div", { class: "bar", role: "meter", "aria-label": `GPU ${id} memory`, "aria-valuemin": 0, "aria-valuemax": 100 }, p.fill);
  p.table = h("table", { class: "grid procs" },
    h("thead", {}, h("tr", {}, h("th", {}, "PID"), h("th", {}, "Process"), h("th", { class: "num" }, "Memory"),
      h("th", {}, "Owner"), h("th", {}, ""))),
    p.procs);
  const card = h("article", { class: "gpu", "data-gpu": id, "data-node": node || null },
    h("h3", {}, node ? h("span", { class: "badge node", title: "cluster node" }, node) : null, `GPU ${id}`, p.name, p.sim),
    p.bar,
    h("div", { class: "facts" }, p.memory, p.power, p.util, p.temp),
    createPlots(id, p, node),
    p.errors,
    p.table);
  card.parts = p;
  return card;
}

function updateCard(card, gpu) {
  const p = card.parts;
  setText(p.name, gpu.name || "");
  p.sim.hidden = !gpu.simulated;
  const pct = gpu.memory_total && gpu.memory_used !== null && gpu.memory_used !== undefined
    ? (100 * gpu.memory_used) / gpu.memory_total : gpu.memory_usage ?? null;
  p.fill.style.width = `${Math.min(100, Math.max(0, pct || 0)).toFixed(1)}%`;
  p.bar.classList.toggle("high", pct !== null && pct >= 80 && pct < 95);
  p.bar.classList.toggle("full", pct !== null && pct >= 95);
  setAttr(p.bar, "aria-valuenow", pct === null ? null : pct.toFixed(1));
  const used = gpu.memory_used;
  const total = gpu.memory_total;
  setText(p.memory, used !== null && used !== undefined && total
    ? `Memory ${mib(used)} / ${mib(total)} (${pct === null ? "?" : pct.toFixed(0)}%)` : "Memory —");
  const limit = gpu.power_limit !== null && gpu.power_limit !== undefined ? ` / ${num(gpu.power_limit, "W")}` : "";
  setText(p.power, `Power ${num(gpu.power_draw, "W")}${limit}`);
  setText(p.util, `Util ${num(gpu.utilization, "%")}`);
  setText(p.temp, `Temp ${num(gpu.temperature, "°C")}`);
  p.powerLimit = gpu.power_limit;
  drawPlots(gpuKey(gpu), p);
  const errors = Object.entries(gpu.errors || {});
  p.errors.hidden = errors.length === 0;
  setText(p.errors, errors.map(([field, why]) => `${field}: ${why}`).join(" · "));
  const procs = gpu.processes || [];
  p.table.hidden = procs.length === 0;
  const seen = new Set();
  let previous = null;
  for (const proc of procs) {
    seen.add(proc.pid);
    let tr = p.rows.get(proc.pid);
    if (!tr) {
      tr = createProcRow(proc.pid, gpu.id, p.node);
      p.rows.set(proc.pid, tr);
    }
    updateProcRow(tr, proc);
    const expected = previous ? previous.nextSibling : p.procs.firstChild;
    if (tr !== expected) p.procs.insertBefore(tr, expected);
    previous = tr;
  }
  for (const [pid, tr] of p.rows) {
    if (!seen.has(pid)) {
      tr.remove();
      p.rows.delete(pid);
    }
  }
}

function createProcRow(pid, gpu, node) {
  const c = {
    name: h("td", { "data-label": "Process", class: "mono" }),
    memory: h("td", { "data-label": "Memory", class: "num" }),
    owner: h("td", { "data-label": "Owner", class: "owner" }),
  };
  const tr = h("tr", { "data-pid": pid });
  tr.node = node || null; // a cluster node's process: killed there, by its agent (?node=)
  c.kill = h("button", { type: "button", class: "btn danger", "data-action": "kill", hidden: true,
    onclick: () => killStray(tr, gpu) }, "Kill");
  tr.append(h("td", { "data-label": "PID", class: "mono" }, pid), c.name, c.memory, c.owner,
    h("td", { "data-label": "" }, c.kill));
  tr.cells_ = c;
  return tr;
}

function updateProcRow(tr, proc) {
  const c = tr.cells_;
  tr.proc = proc;
  const stray = !proc.instance_id;
  tr.classList.toggle("stray", stray);
  setAttr(tr, "data-stray", stray ? "true" : null);
  setText(c.name, `${proc.name || "?"}${proc.type && proc.type !== "compute" ? ` (${proc.type})` : ""}`);
  setText(c.memory, proc.gpu_memory_usage === null || proc.gpu_memory_usage === undefined ? "—" : `${proc.gpu_memory_usage} MiB`);
  setText(c.owner, stray ? "stray" : proc.instance_id);
  setAttr(c.owner, "title", stray ? "belongs to no supervised instance" : null);
  c.kill.hidden = !stray;
}

async function killStray(tr, gpu) {
  const { pid, name } = tr.proc;
  const where = tr.node ? ` of node ${tr.node}` : "";
  const ok = await confirmAction(`Kill process ${pid}${where}?`,
    `${name || "This process"} (pid ${pid}) uses GPU ${gpu}${where} and belongs to no instance. ` +
    "It gets SIGTERM, then SIGKILL after 5 s.", "Kill");
  if (!ok) return;
  const query = tr.node ? `?node=${encodeURIComponent(tr.node)}` : "";
  await act(tr.cells_.kill, `kill ${pid}${where}`, async () => {
    const answer = await api(`/api/v1/processes/${encodeURIComponent(pid)}${query}`, { method: "DELETE" });
    return `pid ${pid}${where}: ${answer.message || answer.status}`;
  });
  refreshGpus();
}

/** The confirm step, as a modal dialog (resolves true only for the confirm button). */
function confirmAction(title, text, verb) {
  const dialog = $("#confirm-dialog");
  setText($("#confirm-title"), title);
  setText($("#confirm-text"), text);
  setText($("#confirm-ok"), verb);
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    $("#confirm-cancel").focus();
  });
}

// -- configuration errors --------------------------------------------------------------------

const refreshErrors = refresher(async () => {
  const errors = await api("/api/v1/config/errors");
  $("#config-empty").hidden = errors.length > 0;
  $("#config-errors").replaceChildren(...errors.map((e) => {
    const where = [e.key ? `key ${e.key}` : null, e.line ? `line ${e.line}` : null].filter(Boolean).join(", ");
    return h("li", {}, h("span", { class: "mono" }, e.file), where ? ` (${where})` : "", `: ${e.message}`);
  }));
}, STATUS_GAP_MS);

// -- the event stream ------------------------------------------------------------------------

let lastEventId = null;
let live = false;

function setLive(state, text) {
  live = state === "on";
  const el = $("#live");
  el.dataset.live = state;
  setText(el, text);
}

function onEvent(type, data) {
  let ev;
  try { ev = JSON.parse(data); } catch { return; }
  switch (type) {
    case "transition": applyTransition(ev); break;
    case "config_error":
    case "config_ok": refreshErrors(); refreshStatus(); break;
    case "reconcile": refreshStatus(); loadHealth().catch(problem); break;
    case "stray":
    case "stray_killed": refreshGpus(); break;
    case "gpu": applyGpuSample(ev); break;
    default: break; // a type this page does not know yet: nothing to do
  }
}

/**
 * Parse a text/event-stream body (the WHATWG algorithm), calling `dispatch(type, data)`;
 * `onOpen` once the first bytes arrived (the server subscribes before it sends anything more).
 */
async function readEvents(body, { dispatch, onOpen, onRetry }) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let type = "";
  let data = [];
  let opened = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    if (!opened) {
      opened = true;
      onOpen();
    }
    buffer += decoder.decode(value, { stream: true });
    // A trailing "\r" may be the first half of "\r\n": keep it for the next chunk.
    const lines = buffer.split(/\r\n|\n|\r(?!$)/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (data.length) dispatch(type || "message", data.join("\n"));
        type = "";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "data") data.push(val);
      else if (field === "event") type = val;
      else if (field === "id" && !val.includes("\0")) lastEventId = val;
      else if (field === "retry" && /^\d+$/.test(val)) onRetry(Number(val));
    }
  }
}

/**
 * Subscribe first, then read the state: whatever happened before the subscription (or while
 * reconnecting) is in the fetched status, everything after it arrives as events. A drop
 * reconnects with Last-Event-ID, after 1 s, 2 s, 4 s ... up to 30 s (with jitter).
 */
async function followEvents() {
  let base = 1000;
  let delay = base;
  const snapshot = () => {
    refreshStatus();
    refreshErrors();
  };
  for (;;) {
    let opened = false;
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
      const res = await api("/api/v1/events", { raw: true, headers });
      await readEvents(res.body, {
        dispatch: onEvent,
        onOpen: () => {
          opened = true;
          setLive("on", "live");
          delay = base;
          snapshot();
        },
        onRetry: (ms) => { base = Math.max(250, ms); },
      });
      // The server ends a stream only when it shuts down, and a new supervisor numbers its
      // events from 1 again: an old Last-Event-ID would make it skip its first events. The
      // snapshot taken on the next open covers the gap instead.
      lastEventId = null;
    } catch (err) {
      if (err instanceof ApiError) problem(err);
    }
    if (!opened) snapshot(); // no stream: show what there is (polling takes over meanwhile)
    const wait = Math.round(delay * (0.8 + Math.random() * 0.4));
    setLive("off", `reconnecting in ${Math.ceil(wait / 1000)} s`);
    await sleep(wait);
    delay = Math.min(delay * 2, RETRY_MAX_MS);
  }
}

// -- instance logs ---------------------------------------------------------------------------

let logFollow = null; // {id, controller}

function openLogs(id) {
  closeLogs();
  const controller = new AbortController();
  logFollow = { id, controller };
  setText($("#logs-title"), `Log · ${id}`);
  $("#logs-body").replaceChildren();
  setText($("#logs-state"), "connecting…");
  $("#logs").hidden = false;
  $("#logs").dataset.instance = id;
  followLog(id, controller.signal).catch((err) => {
    if (controller.signal.aborted) return;
    logNote(`stopped: ${errorText(err)}`);
    setText($("#logs-state"), "stopped");
  });
}

function closeLogs() {
  if (logFollow) logFollow.controller.abort();
  logFollow = null;
  $("#logs").hidden = true;
}

function logNote(text) {
  $("#logs-body").append(h("div", { class: "note" }, text));
}

function appendLogLines(lines) {
  const box = $("#logs-body");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 32;
  const fragment = document.createDocumentFragment();
  for (const line of lines) fragment.append(h("div", {}, line));
  box.append(fragment);
  let excess = box.childElementCount - MAX_LOG_LINES;
  while (excess-- > 0) box.firstElementChild.remove();
  if (atBottom) box.scrollTop = box.scrollHeight;
}

async function followLog(id, signal) {
  // "@" is legal in a path segment, and the server matches instance ids undecoded.
  const path = encodeURIComponent(id).replace(/%40/g, "@");
  const res = await api(`/api/v1/instances/${path}/logs?tail=200&follow=true`,
    { raw: true, signal, headers: { Accept: "text/plain" } });
  setText($("#logs-state"), "following");
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let partial = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const lines = (partial + decoder.decode(value, { stream: true })).split("\n");
    partial = lines.pop();
    if (lines.length) appendLogLines(lines);
  }
  if (partial) appendLogLines([partial]);
  logNote("the server ended the stream");
  setText($("#logs-state"), "ended");
}

// -- history: GPU plots and state strips ---------------------------------------------------------
//
// From GET /api/v1/gpus/history and /api/v1/instances/history once, then extended by the same
// `gpu` and `transition` events that update the rest of the page. Inline SVG: no library, no
// build step. Each plot and strip carries its numbers as data-* attributes (what the browser
// tests compare with the API).

const HISTORY_SECONDS = 900;
const SVG = "http://www.w3.org/2000/svg";
const PLOT_METRICS = [["memory_used", "Memory"], ["utilization", "Util"], ["power_draw", "Power"]];
const gpuHistory = new Map();   // gpuKey -> {t: [], memory_used: [], utilization: [], power_draw: [], memory_total}
const stateHistory = new Map(); // instance id -> {state: at the window's start, transitions: [{t, to}]}
let clockSkew = 0;              // server clock - this browser's clock, seconds
const serverNow = () => Date.now() / 1000 + clockSkew;

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

async function loadHistory() {
  const [gpus, states] = await Promise.all([api("/api/v1/gpus/history"), api("/api/v1/instances/history")]);
  clockSkew = gpus.now - Date.now() / 1000;
  for (const g of gpus.gpus) {
    const key = gpuKey(g);
    const have = gpuHistory.get(key);
    const newer = have ? have.t.filter((t) => t > g.t[g.t.length - 1]).length : 0; // events that came meanwhile
    const series = { t: g.t, memory_used: g.memory_used, utilization: g.utilization, power_draw: g.power_draw,
      memory_total: g.memory_total };
    if (have && newer) for (const key of ["t", ...PLOT_METRICS.map(([m]) => m)]) series[key].push(...have[key].slice(-newer));
    gpuHistory.set(key, series);
  }
  for (const i of states.instances) {
    const have = stateHistory.get(i.instance_id);
    const last = i.transitions.length ? i.transitions[i.transitions.length - 1].t : -Infinity;
    const later = have ? have.transitions.filter((t) => t.t > last) : [];
    stateHistory.set(i.instance_id, { state: i.state, transitions: [...i.transitions.map((t) => ({ t: t.t, to: t.to })), ...later] });
  }
  for (const [key, card] of cards) drawPlots(key, card.parts);
  drawStrips();
}

function recordGpuSample(ev) {
  const t = ev.sampled_at ? Date.parse(ev.sampled_at) / 1000 : serverNow();
  for (const g of ev.gpus) {
    const key = gpuKey({ id: g.id, node: ev.node });
    let s = gpuHistory.get(key);
    if (!s) gpuHistory.set(key, s = { t: [], memory_used: [], utilization: [], power_draw: [], memory_total: null });
    if (s.t.length && t <= s.t[s.t.length - 1]) continue;
    s.t.push(t);
    for (const [m] of PLOT_METRICS) s[m].push(g[m] ?? null);
    if (g.memory_total) s.memory_total = g.memory_total;
    const since = t - HISTORY_SECONDS;
    let drop = 0;
    while (drop < s.t.length && s.t[drop] < since) drop++;
    if (drop) for (const key of ["t", ...PLOT_METRICS.map(([m]) => m)]) s[key].splice(0, drop);
  }
}

function recordTransition(ev) {
  if (typeof ev.instance !== "string" || typeof ev.to !== "string") return;
  let s = stateHistory.get(ev.instance);
  if (!s) stateHistory.set(ev.instance, s = { state: ev.from || "STOPPED", transitions: [] });
  s.transitions.push({ t: ev.at ? Date.parse(ev.at) / 1000 : serverNow(), to: ev.to });
}

function createPlots(id, p, node) {
  p.plots = {};
  const box = h("div", { class: "plots" });
  for (const [metric, label] of PLOT_METRICS) {
    const line = svg("polyline", { points: "" });
    const el = svg("svg", { class: "plot", viewBox: "0 0 300 40", preserveAspectRatio: "none",
      "data-gpu": id, "data-metric": metric, role: "img",
      "aria-label": `GPU ${id}${node ? ` of ${node}` : ""} ${label}, last 15 minutes` });
    el.append(line);
    const value = h("span", { class: "num" });
    box.append(h("div", { class: "plot-row" }, h("span", { class: "muted" }, label), el, value));
    p.plots[metric] = { el, line, value };
  }
  return box;
}

function drawPlots(key, p) {
  const s = gpuHistory.get(key);
  if (!p || !p.plots || !s) return;
  const now = serverNow();
  const start = now - HISTORY_SECONDS;
  for (const [metric] of PLOT_METRICS) {
    const { el, line, value } = p.plots[metric];
    const ys = s[metric];
    const seen = ys.filter((v) => v !== null && v !== undefined);
    const top = metric === "memory_used" ? s.memory_total || Math.max(1, ...seen)
      : metric === "utilization" ? 100 : Math.max(1, p.powerLimit || 0, ...seen);
    const points = [];
    for (let i = 0; i < s.t.length; i++) {
      if (ys[i] === null || ys[i] === undefined || s.t[i] < start) continue;
      const x = (300 * (s.t[i] - start)) / HISTORY_SECONDS;
      const y = 40 - (40 * Math.min(ys[i], top)) / top;
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    }
    line.setAttribute("points", points.join(" "));
    const last = seen.length ? seen[seen.length - 1] : null;
    setAttr(el, "data-points", points.length);
    setAttr(el, "data-last", last);
    setAttr(el, "data-max", top);
    setText(value, metric === "memory_used" ? (last === null ? "—" : mib(last))
      : num(last, metric === "utilization" ? "%" : "W"));
  }
}

const strips = new Map(); // instance id -> {row, el, title}

function drawStrips() {
  const box = $("#strips");
  const now = serverNow();
  const start = now - HISTORY_SECONDS;
  for (const [id, strip] of strips) {
    if (!instances.has(id)) {
      strip.row.remove();
      strips.delete(id);
    }
  }
  for (const id of [...instances.keys()].sort()) {
    const s = stateHistory.get(id) || { state: instances.get(id).item.state, transitions: [] };
    let strip = strips.get(id);
    if (!strip) {
      const el = svg("svg", { class: "strip", viewBox: "0 0 900 10", preserveAspectRatio: "none", "data-instance": id });
      strip = { el, row: h("div", { class: "strip-row" }, h("span", { class: "mono" }, id), el) };
      strips.set(id, strip);
    }
    box.append(strip.row); // keeps the rows in order (a no-op when already last)
    // Segments: the state at the window's start, then one per transition; the last runs to now.
    const segments = [];
    let state = s.state;
    let from = start;
    for (const t of s.transitions) {
      if (t.t >= start) segments.push([state, from, t.t]);
      state = t.to;
      from = Math.max(start, t.t);
    }
    segments.push([state, from, now]);
    strip.el.replaceChildren(...segments.filter(([, a, b]) => b > a || segments.length === 1).map(([st, a, b]) => {
      const rect = svg("rect", { x: ((a - start) * 900 / HISTORY_SECONDS).toFixed(2), y: 0, height: 10,
        width: Math.max(0.5, (b - a) * 900 / HISTORY_SECONDS).toFixed(2), "data-state": st });
      const title = svg("title", {});
      title.textContent = `${st} ${new Date(a * 1000).toLocaleTimeString()}–${new Date(b * 1000).toLocaleTimeString()}`;
      rect.append(title);
      return rect;
    }));
    setAttr(strip.el, "data-current", state);
    setAttr(strip.el, "data-transitions", s.transitions.filter((t) => t.t >= start).length);
  }
  $("#timeline").hidden = strips.size === 0;
}

// -- start -----------------------------------------------------------------------------------

function tick() {
  drawStrips();
  for (const tr of rows.values()) {
    if (tr.entry && tr.entry.item.state === "RUNNING") {
      const up = uptimeOf(tr.entry);
      setText(tr.cells_.uptime, up === null ? "—" : duration(up));
    }
  }
}

function poll() {
  if (document.hidden) return;
  const now = performance.now();
  const sampled = live && now - gpuEventAt < 2.5 * GPU_POLL_MS; // samples arrive as events
  if (!sampled || now - gpuFetchAt > GPU_FULL_EVERY_MS) refreshGpus();
  // GPU memory per instance moves with the samples; without the event stream, poll it all.
  const gpuInstances = [...instances.values()].some(({ item }) => (item.gpu_ids || []).length);
  if (!live || gpuInstances) refreshStatus();
  if (!live) refreshErrors();
}

function main() {
  $("#logs-close").addEventListener("click", closeLogs);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !$("#logs").hidden && !document.querySelector("dialog[open]")) closeLogs();
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  followEvents(); // it fetches the status and the conf.d errors once subscribed
  loadHealth().catch(problem).finally(() => refreshGpus());
  setInterval(poll, GPU_POLL_MS);
  setInterval(tick, 1000);
  loadHistory().catch(problem);
}

main();
