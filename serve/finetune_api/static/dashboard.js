// The fine-tuning dashboard of `tunekit api`: plain JS over the API itself, the same /v1 endpoints a script
// uses, with the key from the login form (sessionStorage: this tab only) in every request. No build step and
// nothing loaded from elsewhere. Views by the URL's hash: #/jobs, #/job/<id>, #/new, #/playground[/<job id>].
// Every value from the API is written as text (textContent), never as HTML.

const KEY = "tunekit.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const REFRESH_MS = 2000;
const $ = (sel) => document.querySelector(sel);

// ----------------------------------------------------------------------------- the API

class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = "GET", json, form, raw = false } = {}) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  let body = form;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const resp = await fetch(`v1${path}`, { method, headers, body });
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try {
      message = (await resp.json()).error.message || message;
    } catch { /* not the API's error envelope: keep the status line */ }
    throw new APIError(resp.status, message);
  }
  return raw ? resp : resp.json();
}

// ----------------------------------------------------------------------------- small helpers

function h(tag, props = {}, ...children) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children.filter((c) => c !== null && c !== undefined).map((c) => (c instanceof Node ? c : String(c))));
  return el;
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const num = (x, digits = 4) => (typeof x === "number" ? Number(x.toPrecision(digits)).toString() : "");
const methodOf = (job) => job.method?.type || "supervised";

function statusBadge(status) {
  return h("span", { className: `status s-${status}`, textContent: status });
}

function setError(el, e) {
  el.textContent = e ? e.message || String(e) : "";
}

// A view's refresh loop: the next run starts REFRESH_MS after the last one ended; leaving the view stops it.
let generation = 0;
function poll(fn, ms = REFRESH_MS) {
  const gen = ++generation;
  const tick = async () => {
    if (gen !== generation) return;
    try {
      await fn(() => gen === generation);
      setError($("#notice"), null);
      $("#notice").hidden = true;
    } catch (e) {
      if (gen !== generation) return;
      if (e.status === 401) return showLogin(e.message);
      setError($("#notice"), e);
      $("#notice").hidden = false;
    }
    if (gen === generation) setTimeout(tick, ms);
  };
  tick();
}

// ----------------------------------------------------------------------------- login and routing

function showView(id) {
  for (const el of document.querySelectorAll(".view")) el.hidden = el.id !== id;
  $("#nav").hidden = id === "login";
}

function showLogin(message = "") {
  generation++;
  sessionStorage.removeItem(KEY);
  $("#login-error").textContent = message;
  showView("login");
  $("#login-key").focus();
}

async function login(key) {
  sessionStorage.setItem(KEY, key);
  try {
    await api("/fine_tuning/jobs?limit=1");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    throw e;
  }
}

function route() {
  generation++;
  if (sessionStorage.getItem(KEY) === null) return showLogin();
  const [view = "jobs", arg] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (view === "job" && arg) return showJob(arg);
  if (view === "new") return showNew();
  if (view === "playground") return showPlayground(arg);
  return showJobs();
}

// ----------------------------------------------------------------------------- the jobs list

function showJobs() {
  showView("jobs");
  poll(async (current) => {
    const page = await api("/fine_tuning/jobs?limit=100");
    if (!current()) return;
    $("#jobs-empty").hidden = page.data.length > 0;
    $("#jobs-body").replaceChildren(...page.data.map((job) => h("tr", { className: "job-row" },
      h("td", { className: "nowrap" }, h("a", { href: `#/job/${encodeURIComponent(job.id)}`, textContent: job.id })),
      h("td", {}, statusBadge(job.status)),
      h("td", { className: "mono", textContent: job.model }),
      h("td", { textContent: methodOf(job) }),
      h("td", { textContent: when(job.created_at) }),
      h("td", { className: "mono", textContent: job.fine_tuned_model || "" }))));
  }, 3000);
}

// ----------------------------------------------------------------------------- a job

async function fetchEvents(jobId, known) {
  // Newest first, as the API lists them: read pages until an event already shown (or the oldest one).
  const fresh = [];
  const limit = known.size ? 100 : 1000;
  let after = "";
  for (;;) {
    const page = await api(`/fine_tuning/jobs/${jobId}/events?limit=${limit}${after}`);
    const stop = page.data.findIndex((e) => known.has(e.id));
    fresh.push(...(stop < 0 ? page.data : page.data.slice(0, stop)));
    if (stop >= 0 || !page.has_more || !page.data.length) return fresh;
    after = `&after=${encodeURIComponent(page.data[page.data.length - 1].id)}`;
  }
}

function showJob(jobId) {
  showView("job");
  const id = encodeURIComponent(jobId);
  const state = { events: [], known: new Set() };
  setError($("#job-error"), null);
  for (const el of ["#job-facts", "#job-hp", "#ckpt-body", "#events"]) $(el).replaceChildren();
  drawCharts([]);
  $("#job-id").textContent = jobId;
  $("#job-play").href = `#/playground/${id}`;
  const act = (verb) => async () => {
    try {
      renderJob(await api(`/fine_tuning/jobs/${id}/${verb}`, { method: "POST" }), state.progress);
      setError($("#job-error"), null);
    } catch (e) {
      setError($("#job-error"), e);
    }
  };
  $("#job-pause").onclick = act("pause");
  $("#job-resume").onclick = act("resume");
  $("#job-cancel").onclick = act("cancel");
  poll(async (current) => {
    const [job, fresh, ckpts] = await Promise.all([api(`/fine_tuning/jobs/${id}`), fetchEvents(id, state.known),
      api(`/fine_tuning/jobs/${id}/checkpoints?limit=100`)]);
    if (!current()) return;
    for (const e of fresh) state.known.add(e.id);
    state.events = fresh.concat(state.events);
    const last = state.events.find((e) => e.type === "metrics" && e.data?.total_steps)?.data;  // newest first
    state.progress = last ? `step ${last.step} of ${last.total_steps}` : "";
    renderJob(job, state.progress);
    renderEvents(state.events);
    renderCheckpoints(ckpts.data);
    drawCharts(state.events);
  });
}

function renderJob(job, progress) {
  Object.assign($("#job-status"), { className: `status s-${job.status}`, textContent: job.status });
  const active = !TERMINAL.has(job.status);
  $("#job-pause").hidden = !active || job.status === "paused";
  $("#job-resume").hidden = job.status !== "paused";
  $("#job-cancel").hidden = !active;
  const facts = [["Status", job.status], ["Progress", progress], ["Model", job.model], ["Method", methodOf(job)],
    ["Fine-tuned model", job.fine_tuned_model], ["Created", when(job.created_at)],
    ["Finished", when(job.finished_at)], ["Estimated finish", when(job.estimated_finish)],
    ["Trained tokens", job.trained_tokens], ["Seed", job.seed], ["Suffix", job.user_provided_suffix],
    ["Training file", job.training_file], ["Validation file", job.validation_file]];
  const dl = $("#job-facts");
  dl.replaceChildren();
  for (const [k, v] of facts) if (v !== null && v !== undefined && v !== "") dl.append(h("dt", {}, k), h("dd", {}, v));
  for (const fileId of job.result_files || []) {
    const link = h("a", { href: "#", textContent: "step_metrics.csv", className: "result-file" });
    link.onclick = (ev) => {
      ev.preventDefault();
      download(fileId).catch((e) => setError($("#job-error"), e));
    };
    dl.append(h("dt", {}, "Result file"), h("dd", {}, link));
  }
  if (job.error?.message) dl.append(h("dt", {}, "Error"), h("dd", { className: "error job-failure" }, job.error.message));
  const hp = job.method?.[methodOf(job)]?.hyperparameters || job.hyperparameters || {};
  $("#job-hp").replaceChildren(...Object.entries(hp).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function renderEvents(events) {
  $("#events").replaceChildren(...events.slice(0, 300).map((e) => h("li", { className: `level-${e.level}` },
    h("time", {}, new Date(e.created_at * 1000).toLocaleTimeString()), " ", e.message)));
}

function renderCheckpoints(ckpts) {
  $("#ckpt-body").replaceChildren(...ckpts.map((c) => {
    const m = c.metrics || {};
    return h("tr", {}, h("td", {}, c.step_number), h("td", { className: "mono" }, c.fine_tuned_model_checkpoint),
      h("td", {}, num(m.train_loss)), h("td", {}, num(m.full_valid_loss ?? m.valid_loss)),
      h("td", {}, num(m.full_valid_mean_token_accuracy ?? m.valid_mean_token_accuracy)), h("td", {}, when(c.created_at)));
  }));
}

// The result file through the API, with the key (a plain link could not send it). OpenAI serves it base64-encoded
// (this server too, by default: result_base64): the download is the CSV itself.
async function download(fileId) {
  const [meta, resp] = await Promise.all([api(`/files/${fileId}`), api(`/files/${fileId}/content`, { raw: true })]);
  let blob = await resp.blob();
  const text = (await blob.text()).trim();
  if (text && /^[A-Za-z0-9+/=\s]+$/.test(text)) {
    try {
      blob = new Blob([Uint8Array.from(atob(text.replace(/\s/g, "")), (c) => c.charCodeAt(0))], { type: "text/csv" });
    } catch { /* not base64 after all: the bytes as served */ }
  }
  const a = h("a", { href: URL.createObjectURL(blob), download: meta.filename || `${fileId}.csv` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

// ----------------------------------------------------------------------------- charts (inline SVG)

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawCharts(events) {
  // The metrics events' data, one per step and side (a resumed job may report a step again: the last one wins).
  const bySide = { train_loss: new Map(), valid_loss: new Map(), train_mean_token_accuracy: new Map(),
    valid_mean_token_accuracy: new Map() };
  for (const e of [...events].reverse()) {
    if (e.type !== "metrics" || !e.data) continue;
    for (const [key, map] of Object.entries(bySide)) if (typeof e.data[key] === "number") map.set(e.data.step, e.data[key]);
  }
  const series = (key, name, cls) => ({ name, cls, points: [...bySide[key]].sort((a, b) => a[0] - b[0]) });
  chart($("#loss-chart"), [series("train_loss", "train", "train"), series("valid_loss", "validation", "valid")]);
  chart($("#acc-chart"), [series("train_mean_token_accuracy", "train", "train"),
    series("valid_mean_token_accuracy", "validation", "valid")], [0, 1]);
}

function ticks(lo, hi, n = 4) {  // round values: steps of 1, 2, 2.5 or 5 x 10^k
  const raw = (hi - lo) / n || 1;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(t);
  return out;
}

function chart(el, series, yRange) {
  const W = 560, H = 220, L = 52, R = 14, T = 14, B = 30;
  el.setAttribute("viewBox", `0 0 ${W} ${H}`);
  el.replaceChildren();
  const points = series.flatMap((sr) => sr.points);
  el.dataset.points = points.length;
  if (!points.length) {
    el.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no metrics yet"));
    return;
  }
  const ys = points.map((p) => p[1]);
  let [y0, y1] = yRange || [Math.min(...ys), Math.max(...ys)];
  if (!yRange) {
    const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
    [y0, y1] = [Math.max(0, y0 - pad), y1 + pad];
  }
  const x1 = Math.max(...points.map((p) => p[0]), 1);  // the steps so far, as a loss chart usually scales
  const X = (x) => L + (x / x1) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  for (const y of ticks(y0, y1)) {
    el.append(s("line", { x1: L, x2: W - R, y1: Y(y), y2: Y(y), class: "grid" }),
      s("text", { x: L - 6, y: Y(y) + 4, "text-anchor": "end" }, num(y, 3)));
  }
  for (const x of ticks(0, x1)) {
    el.append(s("text", { x: X(x), y: H - B + 16, "text-anchor": "middle" }, Math.round(x)));
  }
  el.append(s("text", { x: W - R, y: H - 2, "text-anchor": "end" }, "step"));
  series.forEach((sr, i) => {
    if (!sr.points.length) return;
    el.append(s("polyline", { class: `line ${sr.cls}`, points: sr.points.map(([x, y]) => `${X(x)},${Y(y)}`).join(" ") }));
    if (sr.points.length < 60) for (const [x, y] of sr.points) el.append(s("circle", { cx: X(x), cy: Y(y), r: 2.5, class: sr.cls }));
    const last = sr.points[sr.points.length - 1][1];
    el.append(s("text", { x: W - R, y: T + 12 + i * 15, "text-anchor": "end", class: `legend ${sr.cls}` },
      `${sr.name} ${num(last, 3)}`));
  });
}

// ----------------------------------------------------------------------------- a new job

async function loadModels() {
  try {
    const models = (await api("/models")).data.map((m) => m.id);
    $("#model-list").replaceChildren(...models.map((id) => h("option", { value: id })));
    return models;
  } catch (e) {
    if (e.status === 401) throw e;
    return [];  // the form still takes a model typed in
  }
}

async function showNew() {
  showView("new");
  setError($("#new-error"), null);
  const models = await loadModels().catch((e) => showLogin(e.message));
  if (models && !$("#new-model").value) $("#new-model").value = models.find((m) => !m.startsWith("ft:")) || "";
}

async function upload(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return api("/files", { method: "POST", form });
}

async function createJob(ev) {
  ev.preventDefault();
  const button = $("#new-submit");
  button.disabled = true;
  setError($("#new-error"), null);
  try {
    const method = $("#new-method").value;
    const epochs = $("#new-epochs").value.trim();
    const training = await upload($("#new-train").files[0]);
    const valid = $("#new-valid").files[0] ? await upload($("#new-valid").files[0]) : null;
    const body = { model: $("#new-model").value.trim(), training_file: training.id,
      method: { type: method, [method]: { hyperparameters: epochs ? { n_epochs: Number(epochs) } : {} } } };
    if (valid) body.validation_file = valid.id;
    if ($("#new-suffix").value.trim()) body.suffix = $("#new-suffix").value.trim();
    const job = await api("/fine_tuning/jobs", { method: "POST", json: body });
    $("#new-form").reset();
    location.hash = `#/job/${encodeURIComponent(job.id)}`;
  } catch (e) {
    if (e.status === 401) showLogin(e.message);
    else setError($("#new-error"), e);
  } finally {
    button.disabled = false;
  }
}

// ----------------------------------------------------------------------------- the playground

async function showPlayground(jobId) {
  showView("playground");
  const inputs = [...document.querySelectorAll(".play-model")];
  try {
    const models = await loadModels();
    if (jobId) {  // the job's base model, its fine-tuned model, its latest checkpoint
      const id = encodeURIComponent(jobId);
      const [job, ckpts] = await Promise.all([api(`/fine_tuning/jobs/${id}`), api(`/fine_tuning/jobs/${id}/checkpoints`)]);
      const picks = [job.model, job.fine_tuned_model, ckpts.data[0]?.fine_tuned_model_checkpoint];
      inputs.forEach((input, i) => { input.value = picks[i] || ""; });
    } else if (!inputs.some((input) => input.value)) {
      inputs[0].value = models.find((m) => !m.startsWith("ft:")) || "";
    }
  } catch (e) {
    if (e.status === 401) return showLogin(e.message);
    setError($("#notice"), e);
    $("#notice").hidden = false;
  }
}

async function ask(model, messages, panel) {
  const started = performance.now();
  try {
    const answer = await api("/chat/completions", { method: "POST", json: { model, messages, max_tokens: 256 } });
    const ms = Math.round(performance.now() - started);
    const usage = answer.usage ? ` · ${answer.usage.prompt_tokens} in / ${answer.usage.completion_tokens} out tokens` : "";
    panel.querySelector(".answer").textContent = answer.choices?.[0]?.message?.content ?? "";
    panel.querySelector(".stats").textContent = `${ms} ms${usage}`;
  } catch (e) {
    if (e.status === 401) return showLogin(e.message);
    const text = e.status === 503 ? `Chat is unavailable: ${e.message}` : e.message;  // 503: no vLLM server ready
    panel.classList.add("failed");
    panel.querySelector(".answer").textContent = text;
    panel.querySelector(".stats").textContent = `${Math.round(performance.now() - started)} ms · ${e.status || "error"}`;
  }
}

function sendPrompt(ev) {
  ev.preventDefault();
  const system = $("#play-system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []),
    { role: "user", content: $("#play-prompt").value }];
  const models = [...document.querySelectorAll(".play-model")].map((i) => i.value.trim()).filter(Boolean);
  const panels = models.map((model) => h("div", { className: "card answer-panel" },
    h("h3", { className: "mono" }, model), h("p", { className: "answer" }, "…"), h("p", { className: "stats hint" })));
  $("#play-out").replaceChildren(...panels);
  models.forEach((model, i) => ask(model, messages, panels[i]));
}

// ----------------------------------------------------------------------------- start

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await login($("#login-key").value.trim());
    $("#login-key").value = "";
    $("#login-error").textContent = "";
    route();
  } catch (e) {
    $("#login-error").textContent = e.message;
  }
});
$("#logout").addEventListener("click", () => showLogin());
$("#new-form").addEventListener("submit", createJob);
$("#play-form").addEventListener("submit", sendPrompt);
window.addEventListener("hashchange", route);

// A server without a key (loopback, no TUNEKIT_API_KEY) answers without one: no login then.
if (sessionStorage.getItem(KEY) === null) {
  try {
    await api("/fine_tuning/jobs?limit=1");
    sessionStorage.setItem(KEY, "");
  } catch { /* a key is needed: the form asks for it */ }
}
route();
