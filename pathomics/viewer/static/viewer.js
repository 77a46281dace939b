// pathomics view: one slide in OpenSeadragon with switchable overlays drawn on a canvas above it.
// The URL hash is the state: #slide=ID&overlays=tissue,patches,qc,attention,risk (checkboxes write it;
// without overlays= the current ones stay, at first tissue, attention and risk).
"use strict";

// Attention and risk colours: RdYlBu reversed, low (blue) to high (red). Attention is coloured by its
// rank within the slide, risk by its rank within the cohort (signatures.parquet).
const COLOURMAP = [[49, 54, 149], [116, 173, 209], [255, 255, 191], [244, 109, 67], [165, 0, 38]];
const STYLE = {
  tissueFill: "rgba(0, 255, 0, 0.2)", tissueLine: "rgb(0, 200, 0)", tissueLineWidth: 2,
  patches: "rgba(0, 0, 255, 0.3)", qc: "rgba(255, 0, 255, 0.5)", attentionAlpha: 0.5,
};
const ALL_OVERLAYS = ["tissue", "patches", "qc", "attention", "risk"];
const DEFAULT_OVERLAYS = ["tissue", "attention", "risk"];

const $ = (selector) => document.querySelector(selector);
const state = { index: null, slide: null, data: null, overlays: new Set(DEFAULT_OVERLAYS), ready: null };
let viewer = null;

function colour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (COLOURMAP.length - 1);
  const i = Math.min(Math.floor(x), COLOURMAP.length - 2);
  return COLOURMAP[i].map((c, k) => Math.round(c + (COLOURMAP[i + 1][k] - c) * (x - i)));
}

function parseHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const overlays = params.has("overlays") && new Set(params.get("overlays").split(",").filter((o) => ALL_OVERLAYS.includes(o)));
  return { slide: params.get("slide"), overlays };  // overlays false: keep the current ones
}

function writeHash() {
  const params = new URLSearchParams({ slide: state.slide || "", overlays: [...state.overlays].join(",") });
  location.hash = params.toString().replace(/%2C/g, ",");
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

// The slide's current view: level-0 pixels -> viewer-element CSS pixels is x * scale + origin.
function transform() {
  const item = viewer && viewer.world.getItemAt(0);
  if (!item || !state.data) return null;
  const origin = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const edge = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(state.data.width, 0));
  return { x: origin.x, y: origin.y, scale: (edge.x - origin.x) / state.data.width };
}

function draw() {
  const canvas = $("#overlay");
  const dpr = window.devicePixelRatio || 1;
  const width = Math.round(canvas.clientWidth * dpr), height = Math.round(canvas.clientHeight * dpr);
  if (canvas.width !== width || canvas.height !== height) Object.assign(canvas, { width, height });
  const ctx = canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, width, height);
  drawRisk();
  const t = transform();
  if (!t) return;
  ctx.setTransform(t.scale * dpr, 0, 0, t.scale * dpr, t.x * dpr, t.y * dpr);
  const d = state.data, size = d.patch_size_level0, on = (name) => state.overlays.has(name) && d[name];
  const tissue = new Path2D();  // every ring; filled even-odd so that holes stay empty
  for (const ring of on("tissue") ? d.tissue.flat() : []) {
    ring.forEach(([x, y], i) => (i ? tissue.lineTo(x, y) : tissue.moveTo(x, y)));
    tissue.closePath();
  }
  ctx.fillStyle = STYLE.tissueFill;
  ctx.fill(tissue, "evenodd");
  if (on("attention")) {
    const a = d.attention;
    a.fill.forEach((fill, i) => {
      ctx.fillStyle = fill;
      ctx.fillRect(a.x[i], a.y[i], size, size);
    });
  }
  if (on("patches")) {
    ctx.fillStyle = STYLE.patches;
    d.patches.x.forEach((x, i) => ctx.fillRect(x, d.patches.y[i], size, size));
  }
  if (on("qc")) {
    ctx.fillStyle = STYLE.qc;
    d.qc.pass.forEach((pass, i) => pass || ctx.fillRect(d.qc.x[i], d.qc.y[i], size, size));
  }
  ctx.strokeStyle = STYLE.tissueLine;  // the outline last, on top of the patch overlays
  ctx.lineWidth = STYLE.tissueLineWidth / t.scale;
  ctx.stroke(tissue);
}

function drawRisk() {
  const badge = $("#risk"), d = state.data;
  badge.hidden = !(d && d.risk !== null && state.overlays.has("risk"));
  if (badge.hidden) return;
  badge.style.background = `rgb(${colour(d.risk_percentile).join(",")})`;
  badge.textContent = `risk ${d.risk.toFixed(3)} · rank ${d.risk_rank} of ${d.cohort_size}`;
}

function describe() {
  const d = state.data, parts = [`${d.slide_id}: ${d.width} × ${d.height} px at ${d.mpp.toFixed(3)} µm/px`,
    `${d.patches.x.length} kept patches of ${d.patch_size_level0} level-0 px`];
  if (d.qc) {
    const failed = d.qc.pass.filter((p) => !p).length;
    const flags = Object.entries(d.qc.flags).map(([name, v]) => `${name} ${v.filter(Boolean).length}`).join(", ");
    parts.push(`QC: ${failed} of ${d.qc.pass.length} patches flagged${flags ? ` (${flags})` : ""}`);
  }
  if (d.risk !== null) parts.push(`risk ${d.risk.toFixed(3)}, rank ${d.risk_rank} of ${d.cohort_size} (higher = worse)`);
  $("#summary").textContent = parts.join(". ") + ".";
  $("#problems").replaceChildren(...d.problems.map((p) => Object.assign(document.createElement("li"), { textContent: p })));
  for (const box of document.querySelectorAll("#overlays input")) {
    box.disabled = box.value !== "patches" && (box.value === "risk" ? d.risk === null : !d[box.value]);
  }
}

// What the side panel says about the patch under the mouse (level-0 x, y): its attention rank and QC flags.
function showPatch(x, y) {
  const d = state.data, size = d ? d.patch_size_level0 : 0;
  const find = (xs, ys) => xs.findIndex((px, i) => px <= x && x < px + size && ys[i] <= y && y < ys[i] + size);
  const i = d ? find(d.patches.x, d.patches.y) : -1;
  const parts = i < 0 ? [] : [`patch at (${d.patches.x[i]}, ${d.patches.y[i]})`];
  const a = i < 0 || !d.attention ? -1 : find(d.attention.x, d.attention.y);
  if (a >= 0) {
    const n = d.attention.value.length, rank = Math.round((1 - d.attention.scaled[a]) * (n - 1)) + 1;
    parts.push(`attention ${d.attention.value[a].toPrecision(3)} (rank ${rank} of ${n})`);
  }
  const q = i < 0 || !d.qc ? -1 : find(d.qc.x, d.qc.y);
  if (q >= 0) {
    const flags = Object.keys(d.qc.flags).filter((name) => d.qc.flags[name][q]);
    parts.push(d.qc.pass[q] ? "QC passed" : `QC flagged${flags.length ? `: ${flags.join(", ")}` : ""}`);
  }
  $("#info").textContent = parts.join(" · ");
}

function listSlides() {
  $("#out").textContent = state.index.out;
  $("#slides").replaceChildren(...state.index.slides.map((s) => {
    const link = Object.assign(document.createElement("a"), {
      textContent: s.risk === null ? s.slide_id : `${s.slide_id} (risk ${s.risk.toFixed(3)})`,
      href: "#" + new URLSearchParams({ slide: s.slide_id }).toString(),  // the overlays stay as they are
    });
    if (s.thumbnail) link.prepend(Object.assign(document.createElement("img"), { src: s.thumbnail, alt: "", loading: "lazy" }));
    const item = document.createElement("li");
    item.dataset.slide = s.slide_id;
    item.append(link);
    return item;
  }));
  if (!state.index.slides.length) $("#summary").textContent = "No tiled slides in this folder.";
  $("#problems").replaceChildren(...state.index.problems.map((p) => Object.assign(document.createElement("li"), { textContent: p })));
}

// Opens a slide: tiles and overlay data; state.ready resolves once both are in and drawn.
function openSlide(slideId) {
  state.slide = slideId;
  state.data = null;
  for (const item of document.querySelectorAll("#slides li")) item.classList.toggle("current", item.dataset.slide === slideId);
  const id = encodeURIComponent(slideId), dzi = `dzi/${id}.dzi`;
  const tiles = new Promise((resolve, reject) => {
    viewer.addOnceHandler("open", () => viewer.world.getItemAt(0).whenFullyLoaded(resolve));
    viewer.addOnceHandler("open-failed", () => fetch(dzi).then((r) => r.text()).then((why) => reject(new Error(why))));
  });
  viewer.open(dzi);
  const data = getJSON(`api/slides/${id}/overlays`).then((d) => {
    if (state.slide !== slideId) return;
    if (d.attention) d.attention.fill = d.attention.scaled.map((s) => `rgba(${colour(s).join(",")}, ${STYLE.attentionAlpha})`);
    state.data = d;
    describe();
  });
  state.ready = Promise.all([tiles, data]).then(() => new Promise((resolve) => requestAnimationFrame(() => {
    draw();
    requestAnimationFrame(resolve);
  })));
  state.ready.catch((error) => $("#problems").append(Object.assign(document.createElement("li"), { textContent: error.message })));
}

function applyHash() {
  const wanted = parseHash();
  if (wanted.overlays) state.overlays = wanted.overlays;
  for (const box of document.querySelectorAll("#overlays input")) box.checked = state.overlays.has(box.value);
  const slide = wanted.slide || (state.index.slides[0] || {}).slide_id;
  if (slide && slide !== state.slide) openSlide(slide);
  else draw();
}

async function main() {
  viewer = OpenSeadragon({
    element: $("#osd"), prefixUrl: "static/openseadragon/images/", showNavigator: false,
    maxZoomPixelRatio: 4, visibilityRatio: 0.5, gestureSettingsMouse: { clickToZoom: false },
  });
  new OpenSeadragon.MouseTracker({
    element: viewer.element,
    moveHandler: (e) => {
      const item = viewer.world.getItemAt(0);
      const p = item && item.viewerElementToImageCoordinates(e.position);
      if (p) showPatch(p.x, p.y);
    },
  });
  viewer.addHandler("update-viewport", draw);
  viewer.addHandler("resize", draw);
  for (const box of document.querySelectorAll("#overlays input")) {
    box.addEventListener("change", () => {
      if (box.checked) state.overlays.add(box.value); else state.overlays.delete(box.value);
      writeHash();
    });
  }
  window.addEventListener("hashchange", applyHash);
  state.index = await getJSON("api/slides");
  listSlides();
  applyHash();
}

// For tests and the console: the current slide's readiness and where a level-0 point is on the page.
window.pathomicsView = {
  state,
  ready: () => state.ready || Promise.reject(new Error("no slide open")),
  toPage(x, y) {  // straight from OpenSeadragon, so that tests check the overlay's own transform against it
    const item = viewer.world.getItemAt(0), box = $("#osd").getBoundingClientRect();
    const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    return [box.left + p.x, box.top + p.y];
  },
};

main().catch((error) => { $("#summary").textContent = String(error); });
