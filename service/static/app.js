"use strict";
// modret web UI: plain JS, talks to the same-origin API. No external resources.
const $ = (id) => document.getElementById(id);
const state = { file: null, byId: null, tasks: [], page: 0, pages: 1, pageSize: 24, fresh: new Set() };

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// A failed search: the results on screen answer an earlier query, so they go with the error.
function searchFailed(message) {
  $("results").textContent = "";
  setStatus(message, true);
}

const taskLabel = (name) => name.replace(/_/g, " ");

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json() : null;
  if (!response.ok) throw new Error(body && body.message ? body.message : `HTTP ${response.status}`);
  return body;
}

// Images with an API key cannot be plain <img src>: fetch them with the header and show a blob URL.
async function loadImage(img, url) {
  if (!url) { img.alt = "(no stored image)"; return; }
  if (!$("api-key").value.trim()) { img.src = url; return; }
  try {
    const response = await fetch(url, { headers: headers() });
    if (response.ok) img.src = URL.createObjectURL(await response.blob());
  } catch (e) { /* leave the placeholder */ }
}

async function loadTasks() {
  const data = await api("/tasks");
  state.tasks = data.tasks;
  const box = $("tasks");
  box.textContent = "";
  data.tasks.forEach((task, i) => {
    const label = document.createElement("label");
    label.className = "task";
    label.title = task.description + (task.accuracy != null ? ` (accuracy ${task.accuracy.toFixed(2)})` : "");
    const weight = document.createElement("input");
    weight.type = "number"; weight.step = "0.5"; weight.min = "-5"; weight.max = "5";
    weight.value = i === 0 ? "1" : "0";
    weight.dataset.task = task.name;
    weight.className = "task-weight";
    label.append(taskLabel(task.name), weight);
    box.append(label);
  });
}

function chosenTasks() {
  return [...document.querySelectorAll(".task-weight")]
    .map((input) => [input.dataset.task, parseFloat(input.value)])
    .filter(([, w]) => Number.isFinite(w) && w !== 0);
}

function setQueryFile(file) {
  state.file = file; state.byId = null;
  $("preview").src = URL.createObjectURL(file); $("preview").hidden = false;
  $("search").disabled = false;
}

function setQueryId(id, url) {
  state.file = null; state.byId = id;
  $("preview").hidden = false; loadImage($("preview"), url);
  $("search").disabled = false;
  runSearch();
}

// "Why similar": the hit's similarity to the query under every task, on a track centred on 0 so that a
// negative similarity (unlike the query under that task) shows as a bar to the left with its sign. The
// tasks searched with are marked.
function bars(similarities, queried = []) {
  const box = document.createElement("div"); box.className = "bars";
  const searched = new Set(queried);
  for (const [task, value] of Object.entries(similarities || {})) {
    const row = document.createElement("div");
    row.className = "bar" + (value < 0 ? " negative" : "") + (searched.has(task) ? " queried" : "");
    row.dataset.task = task;
    const name = document.createElement("span"); name.className = "name"; name.textContent = taskLabel(task);
    if (searched.has(task)) name.title = "searched with this task";
    const number = document.createElement("span"); number.className = "value";
    number.textContent = (value > 0 ? "+" : "") + value.toFixed(2);
    const track = document.createElement("span"); track.className = "track";
    const fill = document.createElement("span"); fill.className = "fill";
    fill.style.width = `${Math.min(1, Math.abs(value)) * 50}%`;
    track.append(fill);
    row.append(name, number, track); box.append(row);
  }
  return box;
}

// An item's labels as the gallery keeps them (names, e.g. "colour: green"), the queried tasks' first.
function labelsLine(labels, queried = []) {
  const line = document.createElement("div"); line.className = "labels";
  const names = Object.keys(labels || {});
  const first = new Set(queried);
  names.sort((a, b) => (first.has(b) - first.has(a)) || a.localeCompare(b));
  for (const name of names) {
    const chip = document.createElement("span"); chip.className = "label" + (first.has(name) ? " queried" : "");
    chip.textContent = `${name}: ${labels[name]}`;
    line.append(chip);
  }
  return line;
}

function showResults(data) {
  const grid = $("results"); grid.textContent = "";
  const queried = data.tasks.map((t) => t.task);
  for (const hit of data.results) {
    const card = document.createElement("div"); card.className = "card result";
    const img = document.createElement("img"); loadImage(img, hit.image_url);
    img.addEventListener("click", () => setQueryId(hit.id, hit.image_url));
    const score = document.createElement("div"); score.className = "score";
    score.textContent = `#${hit.rank}  score ${hit.score.toFixed(3)}`;
    card.append(img, score, labelsLine(hit.labels, queried), bars(hit.similarities, queried));
    grid.append(card);
  }
  const t = data.timing_ms;
  setStatus(`${data.results.length} results for ${data.task} — decode ${t.decode} ms, queue ${t.queue} ms, embed ${t.embed} ms, search ${t.search} ms`);
}

async function runSearch() {
  const tasks = chosenTasks();
  if (!tasks.length) { searchFailed("give at least one task a non-zero weight"); return; }
  if (!state.file && state.byId == null) { searchFailed("choose a query image first"); return; }
  const params = new URLSearchParams();
  tasks.forEach(([name, w]) => params.append("task", `${name}:${w}`));
  params.set("k", $("k").value || "12");
  if ($("explain").checked) params.set("explain", "true");
  const options = { method: "POST" };
  if (state.byId != null) params.set("by_id", state.byId);
  else { const form = new FormData(); form.append("image", state.file); options.body = form; }
  setStatus("searching…");
  try { showResults(await api(`/search?${params}`, options)); }
  catch (e) { searchFailed(e.message); }
}

const pageCount = (total) => Math.max(1, Math.ceil(total / state.pageSize));

function showPager(total) {
  state.pages = pageCount(total);
  $("page").textContent = ` ${state.page + 1} / ${state.pages} (${total} images) `;
  $("prev").disabled = state.page <= 0;
  $("next").disabled = state.page >= state.pages - 1;
}

const fetchPage = (page) => api(`/images?offset=${page * state.pageSize}&limit=${state.pageSize}`);

// One page of the gallery (ids in ascending order). A page past the end (the gallery shrank, or `last`)
// becomes the last page, so the pager never shows "7 / 6".
async function loadGallery({ last = false } = {}) {
  try {
    let data = await fetchPage(state.page);
    const lastPage = pageCount(data.total) - 1;
    if (last || state.page > lastPage) {
      if (state.page !== lastPage) { state.page = lastPage; data = await fetchPage(state.page); }
    }
    const grid = $("gallery"); grid.textContent = "";
    for (const item of data.items) {
      const cell = document.createElement("div"); cell.className = "thumb";
      cell.dataset.id = item.id;
      if (state.fresh.has(item.id)) cell.classList.add("fresh");
      const img = document.createElement("img"); loadImage(img, item.image_url);
      cell.append(img, `#${item.id}`);
      cell.title = Object.entries(item.labels || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
      cell.addEventListener("click", () => setQueryId(item.id, item.image_url));
      grid.append(cell);
    }
    showPager(data.total);
    const first = grid.querySelector(".fresh");
    if (first) first.scrollIntoView({ block: "nearest" });
  } catch (e) { setStatus(e.message, true); }
}

// New images get the highest ids, so they are on the last page: go there and mark them.
async function uploadToGallery(files) {
  const form = new FormData();
  for (const file of files) form.append("images", file);
  try {
    const data = await api("/images", { method: "POST", body: form });
    const dups = data.items.filter((i) => i.duplicate).length;
    state.fresh = new Set(data.items.map((i) => i.id));
    await loadGallery({ last: dups < data.items.length });
    setStatus(`added ${data.items.length - dups} image(s)` + (dups ? `, ${dups} already present` : ""));
  } catch (e) { setStatus(e.message, true); }
}

function init() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) setQueryFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => { if (e.target.files.length) setQueryFile(e.target.files[0]); });
  $("search").addEventListener("click", runSearch);
  $("upload").addEventListener("change", async (e) => {
    await uploadToGallery(e.target.files);
    e.target.value = "";  // choosing the same file again is a new upload
  });
  $("prev").addEventListener("click", () => { if (state.page > 0) { state.page--; loadGallery(); } });
  $("next").addEventListener("click", () => { if (state.page < state.pages - 1) { state.page++; loadGallery(); } });
  $("api-key").value = localStorage.getItem("modret-key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("modret-key", $("api-key").value); boot(); });
  boot();
}

async function boot() {
  try { await loadTasks(); await loadGallery(); setStatus("ready"); }
  catch (e) { searchFailed(e.message); }
}

init();
