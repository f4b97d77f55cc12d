// The offload dashboard: polls GET /dashboard/state every two seconds and draws it. No
// framework, no build step, no request to any host but this gateway.
"use strict";

const POLL_MS = 2000;
// Colours from Okabe and Ito's palette (and Tol's wine for dead), told apart by the common
// kinds of colour blindness, each line also drawn its own way (solid, dashed, dotted), so no
// reader depends on colour alone.
const DEPTH_SERIES = [
  { key: "ready", label: "Ready", color: "#0072b2", dash: "" },
  { key: "scheduled", label: "Scheduled", color: "#d55e00", dash: "8 4" },
  { key: "dead", label: "Dead", color: "#882255", dash: "2 3" },
];
const RATE_SERIES = [
  { key: "submitted", label: "Submitted/s", color: "#0072b2", dash: "" },
  { key: "succeeded", label: "Succeeded/s", color: "#007a5a", dash: "" },
  { key: "failed", label: "Failed/s", color: "#d55e00", dash: "8 4" },
  { key: "dead", label: "Dead/s", color: "#882255", dash: "2 3" },
];
const SVG = "http://www.w3.org/2000/svg";

const byId = (id) => document.getElementById(id);

function setText(id, value) {
  const node = byId(id);
  const text = value === undefined || value === null ? "–" : String(value);
  if (node.textContent !== text) node.textContent = text;
}

function notify(text, isError) {
  const notice = byId("notice");
  notice.textContent = text;
  notice.classList.toggle("error", Boolean(isError));
}

async function call(method, path) {
  // X-Requested-By: the gateway refuses a change made with a browser login without it, so a
  // form on another site cannot use this browser's login.
  const headers = { accept: "application/json", "x-requested-by": "offload-dashboard" };
  // From the origin, not the page's URL: a page opened as http://user:key@host/ would make
  // every relative URL carry those credentials, which fetch refuses. The browser still sends
  // the login it made for this origin.
  const response = await fetch(new URL(path, window.location.origin), { method, credentials: "same-origin", headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${response.status} ${response.statusText}`);
    error.code = body.code;
    error.status = response.status;
    throw error;
  }
  return body;
}

function badge(id, text, good, bad) {
  const node = byId(id);
  setText(id, text);
  node.classList.toggle("ok", good.includes(text));
  node.classList.toggle("bad", bad.includes(text));
  node.classList.toggle("warn", !good.includes(text) && !bad.includes(text));
}

// Per-second rates between consecutive samples that both have totals.
function rates(history) {
  const points = [];
  for (let i = 1; i < history.length; i++) {
    const before = history[i - 1];
    const after = history[i];
    const seconds = (after.at - before.at) / 1000;
    if (!before.totals || !after.totals || seconds <= 0) continue;
    const point = { at: after.at };
    for (const { key } of RATE_SERIES) {
      point[key] = Math.max(0, after.totals[key] - before.totals[key]) / seconds;
    }
    points.push(point);
  }
  return points;
}

function drawChart(svgId, legendId, points, series, unit) {
  const svg = byId(svgId);
  const width = 600;
  const height = 160;
  for (const line of svg.querySelectorAll("polyline, line")) line.remove();
  const max = Math.max(1, ...points.flatMap((point) => series.map(({ key }) => point[key] || 0)));
  const axis = byId(svgId.replace("-chart", "-axis"));
  if (points.length > 1) {
    const first = points[0].at;
    const now = points[points.length - 1].at;
    const span = Math.max(1, now - first);
    // A grid line each minute back from the latest sample, and the time at each end.
    for (let minute = 1; minute * 60000 < span; minute++) {
      const x = ((span - minute * 60000) / span) * width;
      const grid = document.createElementNS(SVG, "line");
      grid.setAttribute("class", "grid");
      for (const [name, value] of [["x1", x], ["x2", x], ["y1", 0], ["y2", height]]) grid.setAttribute(name, value.toFixed(1));
      svg.appendChild(grid);
    }
    axis.replaceChildren(
      ...[`${ago(span)} ago`, `${ago(span / 2)} ago`, "now"].map((text) => Object.assign(document.createElement("span"), { textContent: text })),
    );
    for (const { key, color, dash } of series) {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("stroke", color);
      if (dash) line.setAttribute("stroke-dasharray", dash);
      line.setAttribute(
        "points",
        points
          .map((point) => {
            const x = ((point.at - first) / span) * width;
            const y = height - 4 - ((point[key] || 0) / max) * (height - 8);
            return `${x.toFixed(1)},${y.toFixed(1)}`;
          })
          .join(" "),
      );
      svg.appendChild(line);
    }
  }
  const last = points[points.length - 1] || {};
  const legend = byId(legendId);
  legend.replaceChildren(
    ...series.map(({ key, label, color, dash }) => {
      const item = document.createElement("span");
      const swatch = document.createElementNS(SVG, "svg");
      swatch.setAttribute("class", "swatch");
      swatch.setAttribute("viewBox", "0 0 24 8");
      swatch.setAttribute("aria-hidden", "true");
      const stroke = document.createElementNS(SVG, "line");
      for (const [name, value] of [["x1", 0], ["y1", 4], ["x2", 24], ["y2", 4], ["stroke", color], ["stroke-width", 3]]) stroke.setAttribute(name, value);
      if (dash) stroke.setAttribute("stroke-dasharray", dash);
      swatch.append(stroke);
      const value = last[key] === undefined ? "–" : formatNumber(last[key]);
      item.append(swatch, `${label}: ${value}`);
      return item;
    }),
    Object.assign(document.createElement("span"), {
      className: "muted",
      textContent: `scale: 0 to ${formatNumber(max)}${unit}`,
    }),
  );
}

// A span of milliseconds as a reader says it: "45 s", "6 min".
function ago(ms) {
  const seconds = Math.round(ms / 1000);
  return seconds < 120 ? `${seconds} s` : `${Math.round(seconds / 60)} min`;
}

function formatNumber(value) {
  if (!Number.isFinite(value)) return "–";
  return value >= 100 || Number.isInteger(value) ? Math.round(value).toLocaleString("en") : value.toFixed(1);
}

function formatTime(text) {
  return text ? new Date(text).toLocaleTimeString("en-GB") : "–";
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

function taskLink(id) {
  const td = document.createElement("td");
  td.className = "id";
  const link = document.createElement("a");
  link.href = `/tasks/${id}`;
  link.textContent = id.slice(0, 8);
  link.title = id;
  link.setAttribute("aria-label", `task ${id}`);
  td.appendChild(link);
  return td;
}

const CANCELLABLE = new Set(["queued", "scheduled", "running"]);

function renderRecent(tasks) {
  const rows = tasks.map((task) => {
    const row = document.createElement("tr");
    row.dataset.id = task.id;
    const actions = document.createElement("td");
    actions.className = "actions";
    if (CANCELLABLE.has(task.status)) actions.append(actionButton("Cancel", task, cancel));
    row.append(
      taskLink(task.id),
      cell(task.kind),
      cell(task.status, `status status-${task.status}`),
      cell(task.attempts),
      cell(formatTime(task.submitted_at)),
      actions,
    );
    return row;
  });
  if (rows.length === 0) rows.push(emptyRow(6, "No tasks yet."));
  byId("recent").tBodies[0].replaceChildren(...rows);
}

function emptyRow(columns, text) {
  const row = document.createElement("tr");
  const td = cell(text, "muted");
  td.colSpan = columns;
  row.appendChild(td);
  return row;
}

const busy = new Set();

function actionButton(label, task, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.dataset.action = label.toLowerCase();
  button.setAttribute("aria-label", `${label} task ${task.id}`);
  button.disabled = busy.has(task.id);
  if (label === "Discard") button.className = "danger";
  button.addEventListener("click", () => action(task, button));
  return button;
}

async function retry(task, button) {
  busy.add(task.id);
  button.disabled = true;
  try {
    await call("POST", `/dead/${task.id}/retry`);
    notify(`Task ${task.id} is queued again.`);
  } catch (error) {
    notify(`Could not retry task ${task.id}: ${error.message}`, true);
  } finally {
    busy.delete(task.id);
    refresh();
  }
}

async function cancel(task, button) {
  busy.add(task.id);
  button.disabled = true;
  try {
    const answer = await call("POST", `/tasks/${task.id}/cancel`);
    notify(answer.status === "cancelled"
      ? `Task ${task.id} is cancelled.`
      : `Task ${task.id} is running; its handler has been told to stop.`);
  } catch (error) {
    notify(`Could not cancel task ${task.id}: ${error.message}`, true);
  } finally {
    busy.delete(task.id);
    refresh();
  }
}

async function discard(task, button) {
  if (!window.confirm(`Discard task ${task.id} for good?`)) return;
  busy.add(task.id);
  button.disabled = true;
  try {
    await call("DELETE", `/dead/${task.id}`);
    notify(`Task ${task.id} is discarded.`);
  } catch (error) {
    notify(`Could not discard task ${task.id}: ${error.message}`, true);
  } finally {
    busy.delete(task.id);
    refresh();
  }
}

function renderDead(tasks) {
  const rows = tasks.map((task) => {
    const row = document.createElement("tr");
    row.dataset.id = task.id;
    const actions = document.createElement("td");
    actions.className = "actions";
    actions.append(actionButton("Retry", task, retry), actionButton("Discard", task, discard));
    row.append(
      taskLink(task.id),
      cell(task.kind),
      cell(task.reason),
      cell(task.error, "error"),
      actions,
    );
    return row;
  });
  if (rows.length === 0) rows.push(emptyRow(5, "No dead tasks seen."));
  byId("dead").tBodies[0].replaceChildren(...rows);
}

// On demand only: reading the dead-letter queue scans it.
async function scanDead() {
  try {
    const body = await call("GET", "/dead?limit=50");
    const tasks = body.dead
      .filter((task) => task.id)
      .map((task) => ({ ...task, status: "dead" }));
    renderDead(tasks);
    notify(`The dead-letter queue holds ${body.total}${body.truncated ? "+" : ""} tasks; the newest ${tasks.length} are listed until the next refresh.`);
    pausedDead = Date.now() + 30000;
  } catch (error) {
    notify(`Could not read the dead-letter queue: ${error.message}`, true);
  }
}

// One row per kind, with a Pause or Resume button (scope `admin`).
function renderKinds(kinds) {
  const rows = (kinds || []).map((kind) => {
    const row = document.createElement("tr");
    row.dataset.kind = kind.kind;
    const actions = document.createElement("td");
    actions.className = "actions";
    const action = kind.paused ? "Resume" : "Pause";
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = action;
    button.setAttribute("aria-label", `${action} kind ${kind.kind}`);
    button.disabled = busy.has(`kind:${kind.kind}`);
    button.addEventListener("click", () => toggleKind(kind, action, button));
    actions.append(button);
    row.append(
      cell(kind.kind),
      cell(kind.paused ? "paused" : "running", `kind-${kind.paused ? "paused" : "running"}`),
      cell(kind.ready),
      cell(kind.scheduled),
      cell(kind.in_hand),
      cell(kind.workers),
      actions,
    );
    return row;
  });
  if (rows.length === 0) rows.push(emptyRow(7, kinds ? "No kinds yet." : "The broker cannot be asked."));
  byId("kinds").tBodies[0].replaceChildren(...rows);
  const select = byId("depth-kind");
  const names = ["", ...(kinds || []).map((kind) => kind.kind)];
  const shown = [...select.options].map((option) => option.value);
  if (names.join("\n") !== shown.join("\n")) {
    const chosen = select.value;
    select.replaceChildren(
      ...names.map((name) => Object.assign(document.createElement("option"), { value: name, textContent: name || "all kinds" })),
    );
    select.value = names.includes(chosen) ? chosen : "";
  }
}

async function toggleKind(kind, action, button) {
  const key = `kind:${kind.kind}`;
  busy.add(key);
  button.disabled = true;
  try {
    await call("POST", `/kinds/${encodeURIComponent(kind.kind)}/${action.toLowerCase()}`);
    notify(`Kind ${kind.kind} is ${action === "Pause" ? "paused" : "resumed"}.`);
  } catch (error) {
    notify(`Could not ${action.toLowerCase()} kind ${kind.kind}: ${error.message}`, true);
  } finally {
    busy.delete(key);
    refresh();
  }
}

// One row per schedule: when it ticks, its next tick, its latest task, and a Pause or Resume
// button (scope `admin`).
function renderSchedules(schedules, total) {
  const rows = (schedules || []).map((schedule) => {
    const row = document.createElement("tr");
    row.dataset.schedule = schedule.name;
    const when = schedule.every
      ? `every ${schedule.every}`
      : `${schedule.cron}${schedule.timezone ? ` (${schedule.timezone})` : ""}`;
    const last = schedule.last_task;
    const state = schedule.paused ? "paused" : "running";
    const actions = document.createElement("td");
    actions.className = "actions";
    const action = schedule.paused ? "Resume" : "Pause";
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = action;
    button.setAttribute("aria-label", `${action} schedule ${schedule.name}`);
    button.disabled = busy.has(`schedule:${schedule.name}`);
    button.addEventListener("click", () => toggleSchedule(schedule, action, button));
    actions.append(button);
    row.append(
      cell(schedule.name),
      cell(when),
      cell(schedule.task.kind),
      cell(state, `kind-${state}`),
      cell(schedule.next.length ? formatTime(schedule.next[0]) : "–", "next"),
      last ? taskLink(last.id) : cell("–"),
      last ? cell(last.status, `status status-${last.status}`) : cell("–"),
      actions,
    );
    return row;
  });
  if (rows.length === 0) rows.push(emptyRow(8, schedules ? "No schedules." : "This gateway keeps no schedules (EVENTS=off), or is still reading them."));
  byId("schedules").tBodies[0].replaceChildren(...rows);
  if (schedules && total > schedules.length) {
    setText("schedules-note", `The first ${schedules.length} of ${total} schedules by name; GET /schedules lists them all.`);
  }
}

async function toggleSchedule(schedule, action, button) {
  const key = `schedule:${schedule.name}`;
  busy.add(key);
  button.disabled = true;
  try {
    await call("POST", `/schedules/${encodeURIComponent(schedule.name)}/${action.toLowerCase()}`);
    notify(`Schedule ${schedule.name} is ${action === "Pause" ? "paused" : "resumed"}.`);
  } catch (error) {
    notify(`Could not ${action.toLowerCase()} schedule ${schedule.name}: ${error.message}`, true);
  } finally {
    busy.delete(key);
    refresh();
  }
}

// The depth chart's points: every queue, or one kind's ready tasks.
function depthPoints(samples, kind) {
  const withDepth = samples.filter((sample) => sample.depth);
  if (!kind) return withDepth.map((sample) => ({ at: sample.at, ...sample.depth }));
  return withDepth.map((sample) => {
    const found = (sample.depth.kinds || []).find((entry) => entry.kind === kind);
    return { at: sample.at, ready: found ? found.ready : 0 };
  });
}

let pausedDead = 0;
let timer;
let lastState;

function render(state) {
  lastState = state;
  badge("broker-state", state.broker, ["connected"], ["disconnected", "unroutable"]);
  badge("events-state", state.events, ["live"], ["off"]);
  badge("confirms-state", state.confirms, ["ok"], ["timing_out"]);
  const samples = state.history;
  const latest = samples.length ? samples[samples.length - 1] : {};
  const depth = latest.depth || {};
  setText("depth-ready", depth.ready);
  setText("depth-scheduled", depth.scheduled);
  setText("depth-dead", depth.dead);
  setText("workers", depth.consumers);
  const withTotals = samples.filter((sample) => sample.totals);
  const totals = state.totals || (withTotals.length ? withTotals[withTotals.length - 1].totals : {});
  setText("total-submitted", totals.submitted);
  setText("total-succeeded", totals.succeeded);
  setText("total-failed", totals.failed);
  setText("total-dead", totals.dead);
  setText("total-cancelled", totals.cancelled);
  setText("total-expired", totals.expired);
  renderKinds(state.kinds);
  renderSchedules(state.schedules, state.schedules_total);
  const kind = byId("depth-kind").value;
  const series = kind ? [{ key: "ready", label: `Ready (${kind})`, color: DEPTH_SERIES[0].color }] : DEPTH_SERIES;
  drawChart("depth-chart", "depth-legend", depthPoints(samples, kind), series, " tasks");
  drawChart("rate-chart", "rate-legend", rates(samples), RATE_SERIES, " tasks/s");
  renderRecent(state.recent);
  if (Date.now() > pausedDead) renderDead(state.dead);
  setText("updated", `updated ${new Date().toLocaleTimeString("en-GB")}`);
}

let unreadable = false;

async function refresh() {
  clearTimeout(timer);
  try {
    render(await call("GET", "/dashboard/state"));
    if (unreadable) notify("");
    unreadable = false;
  } catch (error) {
    notify(`Cannot read the gateway's state: ${error.message}`, true);
    unreadable = true;
  }
  timer = setTimeout(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  byId("scan-dead").addEventListener("click", scanDead);
  byId("depth-kind").addEventListener("change", () => lastState && render(lastState));
  refresh();
});
