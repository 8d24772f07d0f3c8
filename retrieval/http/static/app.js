// The retrieval dashboard: plain JavaScript over the HTTP/JSON API (/v1/, docs/http.md).
// Pages are chosen by the URL hash (#collections, #points, #search, #jobs, #engines, #status).
// The API key, when the server wants one, lives in sessionStorage (this tab only).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const page = $("#page");
let timers = [];            // intervals and streams of the current page, stopped when it changes

// ---- the API ----------------------------------------------------------------------------------
function headers(json) {
  const h = {};
  const key = sessionStorage.getItem("apiKey");
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, method = "GET", body) {
  const resp = await fetch(path, { method, headers: headers(body !== undefined),
                                   body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  const data = text && resp.headers.get("content-type")?.includes("json") ? JSON.parse(text) : text;
  if (resp.status === 401) askKey(data.error?.message);
  if (!resp.ok) throw new Error(data.error ? `${data.error.code}: ${data.error.message}` : `HTTP ${resp.status}`);
  return data;
}

function askKey(why) {
  $("#keyform").hidden = false;
  $("#keyerror").textContent = why || "";
}

$("#keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("apiKey", $("#key").value.trim());
  $("#key").value = "";
  $("#keyform").hidden = true;
  route();
});

function showError(err) {
  const box = $("#message");
  box.textContent = String(err.message || err);
  box.hidden = false;
}

// ---- small helpers ----------------------------------------------------------------------------
function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
function indexText(ix) {
  if (!ix) return "?";
  const rest = Object.entries(ix).filter(([k]) => k !== "type").map(([k, v]) => `${k}=${v}`).join(" ");
  return `${ix.type} ${rest}`;
}
function json(text, what) {
  if (!text.trim()) return undefined;
  try { return JSON.parse(text); } catch (e) { throw new Error(`${what} is not valid JSON: ${e.message}`); }
}
function table(cols, rows, onClick) {
  const t = document.createElement("table");
  t.innerHTML = `<thead><tr>${cols.map((c) => `<th class="${c.num ? "num" : ""}">${esc(c.title)}</th>`).join("")}</tr></thead>`;
  const body = document.createElement("tbody");
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.innerHTML = cols.map((c) => `<td class="${c.num ? "num" : ""}">${c.html ? c.html(r) : esc(c.value(r))}</td>`).join("");
    if (onClick) { tr.className = "clickable"; tr.addEventListener("click", () => onClick(r, tr)); }
    body.appendChild(tr);
  }
  t.appendChild(body);
  if (!rows.length) body.innerHTML = `<tr><td colspan="${cols.length}" class="muted">none</td></tr>`;
  return t;
}
async function collectionOptions(select, chosen) {
  const { collections } = await api("/v1/collections");
  select.innerHTML = collections.map((c) => `<option ${c.name === chosen ? "selected" : ""}>${esc(c.name)}</option>`).join("");
  return collections;
}

// ---- pages ------------------------------------------------------------------------------------
const pages = {};

pages.collections = async () => {
  page.innerHTML = `<h2>Collections</h2><div id="cols"></div>
    <h3>Create a collection</h3>
    <form id="create" class="inline">
      <label>name<input name="name" required></label>
      <label>dimension<input name="dimension" type="number" min="1" value="128" required></label>
      <label>metric<select name="metric"><option>l2</option><option>ip</option><option>cosine</option></select></label>
      <label>index<select name="index"><option value="hnsw">hnsw</option><option value="exact">exact</option>
        <option value="faiss">faiss (factory)</option></select></label>
      <label>faiss factory<input name="factory" placeholder="IVF256,Flat"></label>
      <label>shards<input name="shards" type="number" min="1" value="1"></label>
      <button type="submit">Create</button>
    </form>`;
  const load = async () => {
    const { collections } = await api("/v1/collections");
    const cols = [
      { title: "name", value: (c) => c.name },
      { title: "dim", num: true, value: (c) => c.dimension },
      { title: "metric", value: (c) => c.metric },
      { title: "index", value: (c) => indexText(c.index) },
      { title: "points", num: true, value: (c) => c.points },
      { title: "indexed / pending", num: true, value: (c) => `${c.indexed} / ${c.pending}` },
      { title: "memory", num: true, value: (c) => bytes(c.memory_bytes) },
      { title: "shards", num: true, value: (c) => c.shards },
      { title: "state / snapshots", value: (c) => `${c.state}${c.reason ? ": " + c.reason : ""}; ` +
          c.shard_info.map((s) => `#${s.shard} snapshot ${s.snapshot_seq}/${s.last_seq}`).join(", ") },
      { title: "payload indexes", value: (c) => c.payload_indexes.map((p) => `${p.key}:${p.type} (${p.points})`).join(", ") || "—" },
      { title: "", html: (c) => `<button class="danger" data-drop="${esc(c.name)}">drop</button>` },
    ];
    const box = $("#cols");
    box.replaceChildren(table(cols, collections));
    box.querySelectorAll("[data-drop]").forEach((b) => b.addEventListener("click", async () => {
      if (!confirm(`Drop collection ${b.dataset.drop} and all its points?`)) return;
      await api(`/v1/collections/${encodeURIComponent(b.dataset.drop)}`, "DELETE").catch(showError);
      load();
    }));
  };
  $("#create").addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    const index = f.get("index") === "faiss" ? { type: "faiss", factory: f.get("factory") || "HNSW32" } : { type: f.get("index") };
    try {
      await api("/v1/collections", "POST", { name: f.get("name"), dimension: Number(f.get("dimension")),
        metric: f.get("metric"), index, shards: Number(f.get("shards")) });
      e.target.reset();
      load();
    } catch (err) { showError(err); }
  });
  await load();
  timers.push(setInterval(() => load().catch(() => {}), 5000));
};

pages.points = async () => {
  page.innerHTML = `<h2>Point browser</h2>
    <form id="scroll" class="inline">
      <label>collection<select name="collection"></select></label>
      <label>filter (JSON, as the Python client takes it)<textarea name="filter" rows="2" cols="50"
        placeholder='{"must": [{"key": "lang", "equals": "en"}]}'></textarea></label>
      <label>start id<input name="start" type="number" min="0" value="0"></label>
      <label>page size<input name="limit" type="number" min="1" value="20"></label>
      <button type="submit">Scroll</button> <button type="button" id="next" class="secondary" disabled>Next page</button>
    </form>
    <div id="count" class="muted"></div><div id="rows"></div><h3>Payload</h3><pre id="payload" class="muted">click a point</pre>`;
  const form = $("#scroll");
  await collectionOptions(form.collection, sessionStorage.getItem("collection"));
  let next = null;
  const run = async (start) => {
    const name = form.collection.value;
    sessionStorage.setItem("collection", name);
    const filter = json(form.filter.value, "the filter");
    const body = { limit: Number(form.limit.value), start_id: start, with_payloads: true };
    if (filter) body.filter = filter;
    const res = await api(`/v1/collections/${encodeURIComponent(name)}/points/scroll`, "POST", body);
    const cnt = await api(`/v1/collections/${encodeURIComponent(name)}/points/count`, "POST", filter ? { filter } : {});
    $("#count").textContent = `${cnt.count} points match`;
    next = res.next_id;
    $("#next").disabled = next === null;
    $("#rows").replaceChildren(table([
      { title: "id", num: true, value: (p) => p.id },
      { title: "payload", value: (p) => { const s = JSON.stringify(p.payload); return s && s.length > 120 ? s.slice(0, 117) + "..." : s; } },
    ], res.points, async (p) => {
      const [full] = (await api(`/v1/collections/${encodeURIComponent(name)}/points/get`, "POST",
                                { ids: [p.id], with_vectors: true })).points;
      $("#payload").textContent = JSON.stringify({ id: full.id, payload: full.payload,
        vector: full.vector ? `[${full.vector.slice(0, 8).map((x) => x.toFixed(4)).join(", ")}${full.vector.length > 8 ? ", ..." : ""}] (${full.vector.length} numbers)` : null }, null, 2);
    }));
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); run(Number(form.start.value)).catch(showError); });
  $("#next").addEventListener("click", () => run(next).catch(showError));
  if (form.collection.value) await run(0);
};

pages.search = async () => {
  page.innerHTML = `<h2>Search playground</h2>
    <form id="search" class="inline">
      <label>collection<select name="collection"></select></label>
      <label>query vector (JSON array)<textarea name="vector" rows="3" cols="60" placeholder="[0.1, 0.2, ...]"></textarea></label>
      <label>or a stored point's id<input name="point" type="number" min="0" style="width:8rem"></label>
      <button type="button" id="usepoint" class="secondary">Use its vector</button>
      <label>k<input name="k" type="number" min="1" value="10" style="width:5rem"></label>
      <label>ef (0: default)<input name="ef" type="number" min="0" value="0" style="width:6rem"></label>
      <label>nprobe<input name="nprobe" type="number" min="0" value="0" style="width:5rem"></label>
      <label>exact<input name="exact" type="checkbox"></label>
      <label>filter (JSON)<textarea name="filter" rows="2" cols="40"></textarea></label>
      <button type="submit">Search</button>
    </form><div id="took" class="muted"></div><div id="hits"></div>`;
  const form = $("#search");
  await collectionOptions(form.collection, sessionStorage.getItem("collection"));
  $("#usepoint").addEventListener("click", async () => {
    try {
      const { points } = await api(`/v1/collections/${encodeURIComponent(form.collection.value)}/points/get`, "POST",
                                   { ids: [Number(form.point.value)], with_vectors: true, with_payloads: false });
      if (!points.length) throw new Error(`no point ${form.point.value} in ${form.collection.value}`);
      form.vector.value = JSON.stringify(points[0].vector);
    } catch (err) { showError(err); }
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const body = { vector: json(form.vector.value, "the query vector"), k: Number(form.k.value), ef: Number(form.ef.value),
                     nprobe: Number(form.nprobe.value), exact: form.exact.checked, with_payloads: true };
      const filter = json(form.filter.value, "the filter");
      if (filter) body.filter = filter;
      const t0 = performance.now();
      const { hits } = await api(`/v1/collections/${encodeURIComponent(form.collection.value)}/search`, "POST", body);
      $("#took").textContent = `${hits.length} hits in ${(performance.now() - t0).toFixed(1)} ms`;
      $("#hits").replaceChildren(table([
        { title: "#", num: true, value: (h) => hits.indexOf(h) + 1 },
        { title: "id", num: true, value: (h) => h.id },
        { title: "distance", num: true, value: (h) => h.distance.toPrecision(6) },
        { title: "payload", value: (h) => JSON.stringify(h.payload) },
      ], hits));
    } catch (err) { showError(err); }
  });
};

function progressCell(j) {
  const pct = j.total ? Math.min(100, (100 * j.done) / j.total) : (j.state === "succeeded" ? 100 : 0);
  return `<span class="bar" data-job="${esc(j.id)}" title="${esc(`${j.done} / ${j.total ?? "?"}`)}"><div style="width:${pct.toFixed(1)}%"></div></span>
          <span class="muted">${j.total ? pct.toFixed(0) + "%" : ""}</span>`;
}

// A job's server-sent events, read with fetch so the API key can go in a header.
async function follow(id, onRecord) {
  const ctl = new AbortController();
  timers.push({ abort: () => ctl.abort() });
  const resp = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, { headers: headers(false), signal: ctl.signal });
  if (!resp.ok) return;
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const evt = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = evt.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) onRecord(JSON.parse(data));
    }
  }
}

pages.jobs = async () => {
  page.innerHTML = `<h2>Jobs</h2><div id="jobs"></div><h3>Job</h3><pre id="job" class="muted">click a job</pre>`;
  const followed = new Set();
  const render = (jobs) => {
    $("#jobs").replaceChildren(table([
      { title: "id", value: (j) => j.id },
      { title: "kind", value: (j) => j.kind },
      { title: "state", html: (j) => `<span data-state="${esc(j.id)}">${esc(j.state)}</span>` },
      { title: "progress", html: progressCell },
      { title: "message", value: (j) => j.error || j.message },
      { title: "", html: (j) => (["queued", "running"].includes(j.state) ? `<button class="danger" data-cancel="${esc(j.id)}">cancel</button>` : "") },
    ], jobs, (j) => { $("#job").textContent = JSON.stringify(j, null, 2); }));
    $("#jobs").querySelectorAll("[data-cancel]").forEach((b) => b.addEventListener("click", async (e) => {
      e.stopPropagation();
      await api(`/v1/jobs/${encodeURIComponent(b.dataset.cancel)}/cancel`, "POST").catch(showError);
      load();
    }));
  };
  const update = (rec) => {   // one record from a stream: move its bar
    const bar = document.querySelector(`[data-job="${CSS.escape(rec.id)}"]`);
    const state = document.querySelector(`[data-state="${CSS.escape(rec.id)}"]`);
    if (bar) {
      const pct = rec.total ? Math.min(100, (100 * rec.done) / rec.total) : (rec.state === "succeeded" ? 100 : 0);
      bar.firstElementChild.style.width = pct.toFixed(1) + "%";
      bar.title = `${rec.done} / ${rec.total ?? "?"}`;
      bar.nextElementSibling.textContent = rec.total ? pct.toFixed(0) + "%" : "";
    }
    if (state) state.textContent = rec.state;
  };
  const load = async () => {
    const { jobs } = await api("/v1/jobs");
    render(jobs);
    for (const j of jobs) {
      if (["queued", "running"].includes(j.state) && !followed.has(j.id)) {
        followed.add(j.id);
        follow(j.id, update).catch(() => {}).finally(() => { followed.delete(j.id); });
      }
    }
  };
  await load();
  timers.push(setInterval(() => load().catch(() => {}), 3000));
};

pages.engines = async () => {
  page.innerHTML = `<h2>Graphs, cross-encoder indexes and draft datastores</h2>
    <h3>Graphs</h3><div id="graphs"></div>
    <h3>Cross-encoder indexes</h3><div id="ce"></div>
    <h3>Draft datastores</h3><div id="ds"></div>
    <h3>Details</h3><pre id="detail" class="muted">click a row</pre>`;
  const show = (x) => { $("#detail").textContent = JSON.stringify(x, null, 2); };
  const [g, ce, ds] = await Promise.all([api("/v1/graphs"), api("/v1/crossencoder"), api("/v1/datastores")]);
  $("#graphs").replaceChildren(table([
    { title: "name", value: (x) => x.name },
    { title: "nodes", num: true, value: (x) => x.n },
    { title: "edges", num: true, value: (x) => x.m },
    { title: "directed", value: (x) => x.directed },
    { title: "embeddings", value: (x) => (x.embeddings || []).map((e) => (typeof e === "string" ? e : e.name)).join(", ") },
    { title: "models", value: (x) => (Array.isArray(x.models) ? x.models : Object.keys(x.models || {})).join(", ") },
  ], g.graphs, show));
  $("#ce").replaceChildren(table([
    { title: "name", value: (x) => x.name },
    { title: "items", num: true, value: (x) => x.n_items },
    { title: "k_q", num: true, value: (x) => x.k_q },
    { title: "k_i", num: true, value: (x) => x.k_i },
    { title: "scorer", value: (x) => (x.scorer ? (x.scorer.name ?? JSON.stringify(x.scorer).slice(0, 60)) : "") },
    { title: "modes", value: (x) => x.modes.join(", ") },
  ], ce.indexes, show));
  $("#ds").replaceChildren(table([
    { title: "name", value: (x) => x.name },
    { title: "tokens", num: true, value: (x) => x.n_tokens },
    { title: "docs", num: true, value: (x) => x.n_docs },
    { title: "vocab", num: true, value: (x) => x.vocab_size },
    { title: "on disk", num: true, value: (x) => bytes(x.bytes_on_disk) },
  ], ds.datastores, show));
};

// Prometheus text -> [{name, labels, value}]
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (m) out.push({ name: m[1], labels: m[2] || "", value: Number(m[3]) });
  }
  return out;
}
function total(samples, name, labelFilter) {
  return samples.filter((s) => s.name === name && (!labelFilter || s.labels.includes(labelFilter)))
                .reduce((a, s) => a + s.value, 0);
}
function chart(svg, values, unit) {
  const w = 360, h = 140, pad = 36;
  const max = Math.max(1e-9, ...values);
  const pts = values.map((v, i) => `${pad + (i * (w - pad - 4)) / Math.max(1, values.length - 1)},${h - 16 - (v / max) * (h - 30)}`).join(" ");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.innerHTML = `<text x="2" y="12">${esc(max.toPrecision(3))} ${esc(unit)}</text><text x="2" y="${h - 18}">0</text>
    <line x1="${pad}" y1="${h - 16}" x2="${w}" y2="${h - 16}" stroke="#ddd"/><polyline points="${pts}"/>
    <text x="${pad}" y="${h - 2}">last ${values.length} samples, 1 s apart</text>`;
}

pages.status = async () => {
  page.innerHTML = `<h2>Server status</h2><div class="grid">
      <div class="card"><h3>Health per service</h3><div id="services"></div><div id="inflight" class="muted"></div></div>
      <div class="card"><h3>Calls per second (gRPC and HTTP API)</h3><svg class="chart" id="rate"></svg></div>
      <div class="card"><h3>Mean latency (ms)</h3><svg class="chart" id="latency"></svg></div>
    </div>`;
  const rate = [], lat = [];
  let last = null;
  const tick = async () => {
    const st = await api("/v1/status");
    $("#services").replaceChildren(table([
      { title: "service", value: (r) => r[0] },
      { title: "status", html: (r) => `<span class="pill ${r[1] === "SERVING" ? "ok" : "bad"}">${esc(r[1])}</span>` },
    ], Object.entries(st.services)));
    if (st.inflight) $("#inflight").textContent = `in flight: ${st.inflight.unary} calls, ${st.inflight.streams} streams; rejected since start: ${st.inflight.rejected}`;
    const samples = parseMetrics(await api("/v1/metrics"));
    const now = { t: performance.now() / 1000, n: total(samples, "retrieval_requests_total"),
                  sum: total(samples, "retrieval_request_duration_seconds_sum"),
                  cnt: total(samples, "retrieval_request_duration_seconds_count") };
    if (last) {
      const dt = Math.max(1e-3, now.t - last.t);
      rate.push((now.n - last.n) / dt);
      lat.push(now.cnt > last.cnt ? (1000 * (now.sum - last.sum)) / (now.cnt - last.cnt) : 0);
      if (rate.length > 60) { rate.shift(); lat.shift(); }
      chart($("#rate"), rate, "req/s");
      chart($("#latency"), lat, "ms");
    }
    last = now;
  };
  await tick();
  timers.push(setInterval(() => tick().catch(() => {}), 1000));
};

// ---- routing and the health pill --------------------------------------------------------------
async function route() {
  for (const t of timers) (t.abort ? t.abort() : clearInterval(t));
  timers = [];
  $("#message").hidden = true;
  const name = (location.hash || "#collections").slice(1);
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === "#" + name));
  page.dataset.page = name;
  page.dataset.ready = "";
  try {
    await (pages[name] || pages.collections)();
  } catch (err) { showError(err); }
  page.dataset.ready = "1";
}

async function health() {
  const pill = $("#health");
  try {
    const r = await fetch("/healthz");
    const h = await r.json();
    pill.textContent = h.status;
    pill.className = "pill " + (h.status === "SERVING" ? "ok" : "bad");
  } catch (e) {
    pill.textContent = "unreachable";
    pill.className = "pill bad";
  }
}

window.addEventListener("hashchange", route);
route();
health();
setInterval(health, 5000);
