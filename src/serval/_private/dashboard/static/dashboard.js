// The live page: server-sent events from /api/dashboard/events ("history" once, then an
// "update" per sample), rendered without a reload.
"use strict";

const MAX_POINTS = 600;
const series = new Map(); // "app\u0000deployment" -> [point]
const openLogs = new Set(); // replica ids whose log panel is open
let last = null;

const key = (app, dep) => `${app}\u0000${dep}`;
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

function connect() {
  const source = new EventSource("/api/dashboard/events");
  const badge = document.getElementById("connection");
  source.onopen = () => { badge.textContent = "live"; badge.className = "badge RUNNING"; };
  source.onerror = () => { badge.textContent = "reconnecting"; badge.className = "badge UPDATING"; };
  source.addEventListener("history", (e) => {
    series.clear();
    for (const s of JSON.parse(e.data).series) series.set(key(s.app, s.deployment), s.points);
  });
  source.addEventListener("update", (e) => {
    const update = JSON.parse(e.data);
    const error = document.getElementById("error");
    error.hidden = !update.error;
    error.textContent = update.error || "";
    if (update.error) return;
    for (const p of update.points) {
      const k = key(p.app, p.deployment);
      const points = series.get(k) || [];
      points.push(p.point);
      if (points.length > MAX_POINTS) points.splice(0, points.length - MAX_POINTS);
      series.set(k, points);
    }
    last = update;
    render(update);
  });
}

function render(update) {
  const apps = update.details.applications;
  const names = Object.keys(apps).sort();
  const main = document.getElementById("apps");
  const queued = new Map(update.queued_at_callers.map((q) => [key(q.app, q.deployment), q.queued]));
  let replicas = 0;
  for (const n of names) for (const d of Object.values(apps[n].deployments)) replicas += d.replicas.length;
  document.getElementById("summary").textContent =
    `${names.length} application${names.length === 1 ? "" : "s"}, ${replicas} replica${replicas === 1 ? "" : "s"}`;
  document.getElementById("updated").textContent = "updated " + new Date(update.t * 1000).toLocaleTimeString();
  if (!names.length) {
    main.innerHTML = '<p class="empty">No application is deployed.</p>';
    return;
  }
  main.innerHTML = names.map((n) => appHtml(n, apps[n], update, queued)).join("");
  for (const svg of main.querySelectorAll("svg[data-chart]")) drawChart(svg, update.t);
  for (const d of main.querySelectorAll("details.logs")) {
    d.addEventListener("toggle", () => (d.open ? openLogs.add(d.dataset.replica) : openLogs.delete(d.dataset.replica)));
  }
}

function appHtml(name, app, update, queued) {
  const deps = Object.values(app.deployments).sort((a, b) => a.name.localeCompare(b.name));
  return `<section class="app" data-app="${esc(name)}">
    <h2>${esc(name)} <span class="badge ${esc(app.status)}">${esc(app.status)}</span>
      <span class="route">${app.route_prefix === null ? "no HTTP route" : esc(app.route_prefix)}</span></h2>
    ${app.message ? `<pre class="message">${esc(app.message)}</pre>` : ""}
    ${deps.map((d) => deploymentHtml(name, d, update, queued)).join("")}
  </section>`;
}

function deploymentHtml(app, dep, update, queued) {
  const k = key(app, dep.name);
  const points = series.get(k) || [];
  const lastPoint = points.length ? points[points.length - 1] : null;
  const running = dep.replicas.filter((r) => r.state === "RUNNING").length;
  const inFlight = lastPoint ? lastPoint.in_flight : 0;
  const waiting = lastPoint ? lastPoint.waiting : 0;
  const chart = (what) => `<svg data-chart="${what}" data-app="${esc(app)}" data-dep="${esc(dep.name)}"></svg>`;
  return `<div class="deployment" data-deployment="${esc(dep.name)}" data-status="${esc(dep.status)}">
    <h3>${esc(dep.name)} <span class="badge ${esc(dep.status)} deployment-status">${esc(dep.status)}</span></h3>
    ${dep.message ? `<p class="message" data-role="deployment-message">${esc(dep.message)}</p>` : ""}
    <div class="stats">
      <span><b class="replica-count" data-count="${dep.replicas.length}">${dep.replicas.length}</b> replicas
        (${running} running, target ${dep.target_num_replicas})</span>
      <span><b>${inFlight}</b> in flight</span>
      <span><b>${waiting}</b> waiting in replicas</span>
      <span><b>${queued.get(k) || 0}</b> queued at callers</span>
      <span><b>${lastPoint ? lastPoint.rps.toFixed(1) : "–"}</b> req/s</span>
      <span><b>${lastPoint && lastPoint.p99_ms !== null ? lastPoint.p99_ms.toFixed(1) : "–"}</b> ms p99</span>
    </div>
    <div class="charts">
      ${chart("rate")}${chart("latency")}${chart("load")}
    </div>
    <table class="replicas">
      <thead><tr><th>replica</th><th>state</th><th>pid</th><th>node</th><th>started</th>
        <th>running</th><th>waiting</th><th></th></tr></thead>
      <tbody>${dep.replicas.map((r) => replicaHtml(r, update)).join("")}</tbody>
    </table>
  </div>`;
}

function replicaHtml(r, update) {
  const load = update.replicas[r.replica_id] || {running: 0, waiting: 0};
  const lines = update.logs[r.replica_id] || [];
  const state = r.state;
  const started = r.start_time_s ? new Date(r.start_time_s * 1000).toLocaleTimeString() : "";
  const log = `<details class="logs" data-replica="${esc(r.replica_id)}" ${openLogs.has(r.replica_id) ? "open" : ""}>
      <summary>log (${lines.length} lines)</summary>
      <pre>${lines.length ? lines.map(esc).join("\n") : "no log lines (yet)"}</pre></details>`;
  return `<tr class="replica" data-replica="${esc(r.replica_id)}" data-state="${esc(state)}">
    <td><code>${esc(r.replica_id)}</code></td>
    <td><span class="badge ${esc(state)}">${esc(state)}</span></td>
    <td>${esc(r.pid ?? "–")}</td><td>${esc(r.node_id)}</td><td>${esc(started)}</td>
    <td>${load.running}</td><td>${load.waiting}</td><td>${log}</td></tr>`;
}

function drawChart(svg, now) {
  const points = series.get(key(svg.dataset.app, svg.dataset.dep)) || [];
  const col = (f) => points.map((p) => [p.t, p[f]]);
  const kind = svg.dataset.chart;
  // the time shown: what there is, from one minute up to ten
  const span = points.length ? now - points[0].t : 0;
  const windowS = Math.min(600, Math.max(60, Math.ceil(span / 60) * 60));
  if (kind === "rate") {
    lineChart(svg, [
      {name: "req/s", color: "#2f6fdd", values: col("rps")},
      {name: "errors/s", color: "#d33", values: col("errors_per_s")},
    ], {title: "requests per second", now, windowS});
  } else if (kind === "latency") {
    lineChart(svg, [
      {name: "p50", color: "#2a9d8f", values: col("p50_ms")},
      {name: "p90", color: "#e9a23b", values: col("p90_ms")},
      {name: "p99", color: "#d33", values: col("p99_ms")},
    ], {title: "latency (ms)", now, windowS});
  } else {
    lineChart(svg, [
      {name: "in flight", color: "#6a4cc3", values: col("in_flight")},
      {name: "waiting", color: "#999", values: col("waiting")},
    ], {title: "requests in replicas", now, windowS});
  }
}

connect();
