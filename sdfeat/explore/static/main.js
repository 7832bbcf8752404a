// The explorer page: pick a store, block, timestep and seed, an image in the grid, then hover or click its
// tokens. Every number comes from the server (the same maps as `sdfeat show`); this file only draws them.

import { getJSON, imageUrl } from "./api.js";
import { clearCanvas, outline, paintBar, paintMap } from "./colors.js";
import { clearTopk, renderGrid, showTopk } from "./grid.js";

const $ = (id) => document.getElementById(id);
const PAGE = 24;
const state = {
  stores: [], store: 0, meta: null, offset: 0, page: null, row: null, lut: null,
  norm: null, sim: null, cropNorm: null, cropSim: null, topk: null, pinned: null, hover: null, request: null,
};

const api = (what) => `/api/stores/${state.store}/${what}`;
const params = (extra = {}) => ({
  block: $("block").value, t: $("timestep").value, seed: $("seed").value, row: state.row, ...extra,
});
const blockInfo = () => state.meta.blocks.find((b) => b.name === $("block").value);
const same = (a, b) => a && b && a.y === b.y && a.x === b.x;
const status = (message) => { $("status").textContent = message || ""; };

function fillSelect(select, values, labels = values) {
  select.replaceChildren(...values.map((v, i) => new Option(labels[i], v)));
}

async function guarded(work) {
  try {
    return await work();
  } catch (err) {
    if (err.name !== "AbortError") status(err.message);
    return null;
  }
}

async function init() {
  state.lut = (await getJSON("/api/colormap")).colors;
  paintBar($("bar"), state.lut);
  state.stores = await getJSON("/api/stores");
  fillSelect($("store"), state.stores.map((s) => s.index), state.stores.map((s) => `${s.index}: ${s.path}`));
  $("store").addEventListener("change", () => selectStore(Number($("store").value)));
  for (const id of ["block", "timestep", "seed"]) $(id).addEventListener("change", () => loadMaps());
  $("mode").addEventListener("change", () => loadMaps());
  $("k").addEventListener("change", () => loadTopk());
  $("prev").addEventListener("click", () => turnPage(-1));
  $("next").addEventListener("click", () => turnPage(1));
  $("marks").addEventListener("mousemove", onHover);
  $("marks").addEventListener("mouseleave", () => { state.hover = null; draw(); });
  $("marks").addEventListener("click", onClick);
  await selectStore(0);
  setInterval(refresh, 5000);
}

async function selectStore(index) {
  state.store = index;
  state.meta = state.stores[index];
  const blocks = state.meta.blocks;
  fillSelect($("block"), blocks.map((b) => b.name), blocks.map((b) => `${b.name} (${b.shape.join("×")})`));
  $("block").value = (blocks.find((b) => b.name === "up_blocks.1.upsamplers.0") || blocks[blocks.length - 1]).name;
  fillSelect($("timestep"), state.meta.timesteps);
  fillSelect($("seed"), state.meta.seeds);
  state.offset = 0;
  state.row = null;
  showStoreInfo();
  await loadPage();
  const first = state.page.items.find((item) => item.finished && item.ok);
  if (first) await selectRow(first.row);
}

function showStoreInfo() {
  const m = state.meta;
  $("storeinfo").textContent = `${m.model} · ${m.protocol} · ${m.resolution}px · ${m.samples} images, ` +
    `${m.finished} extracted (${m.failed} failed) · units ${m.units_done}/${m.units}`;
}

async function loadPage() {
  state.page = await getJSON(api("samples"), { offset: state.offset, limit: PAGE });
  renderGrid($("grid"), state.store, state.page, state.row, selectRow);
  if (state.topk) showTopk($("grid"), state.topk, state.lut);
  const last = Math.min(state.offset + PAGE, state.page.total);
  $("pageinfo").textContent = `${state.offset + 1}–${last} of ${state.page.total}`;
}

async function turnPage(step) {
  const next = state.offset + step * PAGE;
  if (next < 0 || next >= state.meta.samples) return;
  state.offset = next;
  state.topk = null;
  await loadPage();
  await loadTopk();
}

async function refresh() {  // a store still being written: finished rows appear as their units complete
  if (state.meta.finished >= state.meta.samples) return;
  const meta = await guarded(() => getJSON(`/api/stores/${state.store}`));
  if (!meta) return;
  state.meta = state.stores[state.store] = meta;
  showStoreInfo();
  await guarded(loadPage);
}

async function selectRow(row) {
  state.row = row;
  Object.assign(state, { pinned: null, hover: null, sim: null, cropSim: null, topk: null });
  for (const cell of $("grid").querySelectorAll(".cell")) cell.classList.toggle("selected", Number(cell.dataset.row) === row);
  clearTopk($("grid"));
  $("image").src = imageUrl(state.store, row, 480);
  const item = state.page.items.find((i) => i.row === row);
  $("title").textContent = `#${row} ${item ? item.id : ""}${item && item.label_name ? " · " + item.label_name : ""}`;
  await loadMaps();
}

async function loadMaps() {
  if (state.row === null) return;
  status("");
  const crop = cropMargin();
  state.norm = await guarded(() => getJSON(api("norm"), params()));
  state.cropNorm = crop ? await guarded(() => getJSON(api("norm"), params({ crop }))) : null;
  state.sim = state.cropSim = null;
  draw();
  const token = state.pinned || state.hover;
  if (token && $("mode").value === "similarity") await loadSimilarity(token);
  if (state.pinned) await loadTopk();
}

function cropMargin() {
  const info = blockInfo();
  return info && info.crops.length && state.row < state.meta.crop_samples ? info.crops[0] : null;
}

async function loadSimilarity(token) {
  if (state.request) state.request.abort();
  const request = (state.request = new AbortController());
  const sim = await guarded(() => getJSON(api("similarity"), params(token), request.signal));
  if (!sim || request.signal.aborted) return;
  const crop = cropMargin();
  const [h, w] = sim.shape;
  const inner = token.y > 0 && token.x > 0 && token.y < h - 1 && token.x < w - 1;
  state.cropSim = crop && inner
    ? await guarded(() => getJSON(api("similarity"), params({ crop, y: token.y - 1, x: token.x - 1 }), request.signal))
    : null;
  if (request.signal.aborted) return;
  state.sim = sim;
  draw();
}

async function loadTopk() {
  if (!state.pinned) return;
  const k = Math.max(1, Math.min(32, Number($("k").value) || 3));
  const topk = await guarded(() => getJSON(api("topk"), params({ ...state.pinned, k, start: state.offset, n: PAGE })));
  if (!topk) return;
  state.topk = topk;
  showTopk($("grid"), topk, state.lut);
}

function tokenAt(event) {
  const [, h, w] = blockInfo().shape;
  const rect = $("marks").getBoundingClientRect();
  const x = Math.floor(((event.clientX - rect.left) / rect.width) * w);
  const y = Math.floor(((event.clientY - rect.top) / rect.height) * h);
  return { y: Math.min(h - 1, Math.max(0, y)), x: Math.min(w - 1, Math.max(0, x)) };
}

function onHover(event) {
  const token = tokenAt(event);
  if (same(token, state.hover)) return;
  state.hover = token;
  if (!state.pinned && $("mode").value === "similarity") loadSimilarity(token);
  else draw();
}

function onClick(event) {
  const token = tokenAt(event);
  if (same(token, state.pinned)) {  // a second click on the pinned token releases it
    Object.assign(state, { pinned: null, topk: null });
    clearTopk($("grid"));
    draw();
    return;
  }
  state.pinned = token;
  if ($("mode").value === "similarity") loadSimilarity(token);
  else draw();
  loadTopk();
}

function setScale(vmin, vmax, label) {
  $("vmin").textContent = vmin.toFixed(2);
  $("vmax").textContent = vmax.toFixed(2);
  $("scalelabel").textContent = label;
}

function draw() {
  const overlay = $("overlay"), marks = $("marks");
  clearCanvas(marks);
  const mode = $("mode").value;
  const shape = blockInfo().shape.slice(1);
  if (mode === "norm" && state.norm) {
    paintMap(overlay, state.norm.values, state.norm.vmin, state.norm.vmax, state.lut);
    outline(marks, shape, state.norm.anomalies, "#ff2d2d");
    outline(marks, shape, state.norm.labels, "#ffa500", true);
    setScale(state.norm.vmin, state.norm.vmax, "token norm (red: detected anomalies, dashed orange: labels)");
    overlay.dataset.drawn = `norm:${state.row}`;
  } else if (mode === "similarity" && state.sim) {
    paintMap(overlay, state.sim.values, state.sim.vmin, state.sim.vmax, state.lut);
    setScale(state.sim.vmin, state.sim.vmax, `cosine similarity to token (y=${state.sim.token.y}, x=${state.sim.token.x})`);
    overlay.dataset.drawn = `similarity:${state.row}:${state.sim.token.y}:${state.sim.token.x}`;
  } else {
    clearCanvas(overlay);
    overlay.dataset.drawn = "none";
  }
  if (state.pinned) outline(marks, shape, [state.pinned], "#ff2d2d");
  if (state.hover && !same(state.hover, state.pinned)) outline(marks, shape, [state.hover], "#ffffff");
  drawCrop();
  readout();
}

function drawCrop() {
  const crop = cropMargin();
  $("croppane").hidden = !crop;
  if (!crop || state.row === null) return;
  const full = $("mode").value === "norm" ? state.norm : state.sim;
  const cropped = $("mode").value === "norm" ? state.cropNorm : state.cropSim;
  for (const id of ["cropimg-full", "cropimg-crop"]) $(id).src = imageUrl(state.store, state.row, 200, crop);
  $("cropcaption").textContent = `image cropped by ${crop}px per side (one token), then extracted`;
  if (!full || !cropped) {
    clearCanvas($("overlay-full"));
    clearCanvas($("overlay-crop"));
    return;
  }
  const inner = full.values.slice(1, -1).map((line) => line.slice(1, -1));
  const lo = Math.min(full.vmin, cropped.vmin), hi = Math.max(full.vmax, cropped.vmax);
  paintMap($("overlay-full"), inner, lo, hi, state.lut);
  paintMap($("overlay-crop"), cropped.values, lo, hi, state.lut);
}

function readout() {
  if (!state.norm) return;
  const info = blockInfo();
  const lines = [`${info.name} · C×H×W = ${info.shape.join("×")} · t=${$("timestep").value} seed=${$("seed").value}`];
  const token = state.hover || state.pinned;
  if (token) {
    let text = `token (y=${token.y}, x=${token.x}) · norm ${state.norm.values[token.y][token.x].toFixed(3)}`;
    if (state.sim) text += ` · similarity ${state.sim.values[token.y][token.x].toFixed(3)}`;
    lines.push(text);
  } else {
    lines.push("hover or click a token");
  }
  const t = state.norm.threshold;
  lines.push(`${state.norm.anomalies.length} anomalies detected (pooled ratio > ${t.ratio} over ${t.images} ` +
             `images)` + (state.norm.labels.length ? ` · ${state.norm.labels.length} labelled` : ""));
  $("readout").replaceChildren(...lines.map((l) => Object.assign(document.createElement("div"), { textContent: l })));
}

init().catch((err) => status(err.message));
