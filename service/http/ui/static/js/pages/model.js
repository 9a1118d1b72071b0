// One model's page: card facts, samples (heat map for 2-D models, image grid for image-like ones),
// 1-D marginals, the calibration histogram with the threshold at α, and scoring pasted rows.

import { card as getCard, explain, explainOperation, operation } from "../api.js";
import { PALETTE, VIRIDIS, axisLabel, barsSeries, chart, histogram } from "../charts.js";
import { badge, errorBox, fmt, h } from "../dom.js";
import { parseRows } from "../rows.js";

const GRID = 80;            // heat map cells per axis
const MARGINAL_SAMPLES = 1000;
const ALPHAS = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1];

/** [rows, cols] when the features are the pixels of an image (pixel_<r>_<c>, or a square ≥ 16), else null. */
export function imageShape(featureNames) {
  const cells = featureNames.map((n) => /^pixel_(\d+)_(\d+)$/.exec(n));
  if (cells.every(Boolean)) {
    const rows = 1 + Math.max(...cells.map((m) => +m[1])), cols = 1 + Math.max(...cells.map((m) => +m[2]));
    if (rows * cols === featureNames.length) return [rows, cols];
  }
  const side = Math.round(Math.sqrt(featureNames.length));
  return featureNames.length >= 16 && side * side === featureNames.length ? [side, side] : null;
}

/** The label of each one-hot context feature (label_3 -> "3") when they share a prefix, else null. */
export function oneHotLabels(contextNames) {
  const m = contextNames.map((n) => /^(.*?)[_-]?([0-9A-Za-z]+)$/.exec(n));
  if (contextNames.length < 2 || !m.every(Boolean)) return null;
  const prefix = m[0][1];
  return m.every((x) => x[1] === prefix) ? m.map((x) => x[2]) : null;
}

function drawImage(canvas, row, [rows, cols], lo, hi) {
  canvas.width = cols; canvas.height = rows;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(cols, rows);
  for (let i = 0; i < rows * cols; i++) {
    const t = Math.min(1, Math.max(0, (row[i] - lo) / (hi - lo)));
    const g = Math.round(255 * (1 - t));  // ink is dark on white
    img.data.set([g, g, g, 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
}

export async function renderModel(root, name) {
  const c = await getCard(name);
  const D = c.feature_names.length, C = c.context_names.length;
  const shape = imageShape(c.feature_names);
  const twoD = D === 2;
  const labels = C ? oneHotLabels(c.context_names) : null;
  const state = { temperature: 1, seed: 0, context: C ? c.context_names.map((_, i) => (i === 0 ? 1 : 0)) : null, grid: null };
  const timers = [];

  const withContext = (body, rows) => (state.context ? { ...body, context: rows === 1 ? [state.context] : Array.from({ length: rows }, () => state.context) } : body);

  // -- header and shared controls -------------------------------------------------------------
  const contextPicker = !C ? null : labels
    ? h("span", { id: "context-picker", role: "group", "aria-label": "context" },
        labels.map((label, i) => h("button", { type: "button", class: `pick${i === 0 ? " on" : ""}`, "data-index": i,
          onclick: (e) => {
            state.context = c.context_names.map((_, j) => (j === i ? 1 : 0));
            for (const b of e.currentTarget.parentNode.children) b.classList.toggle("on", b === e.currentTarget);
            redraw();
          } }, label)))
    : h("input", { id: "context-input", size: 30, value: state.context.join(", "), onchange: (e) => {
        const v = e.target.value.split(/[,\s]+/).filter(Boolean).map(Number);
        if (v.length === C && v.every(Number.isFinite)) { state.context = v; redraw(); }
      } });
  const tempValue = h("output", { id: "temperature-value" }, "1.00");
  const tempSlider = h("input", { id: "temperature", type: "range", min: "0.1", max: "1.5", step: "0.05", value: "1",
    oninput: (e) => { tempValue.textContent = Number(e.target.value).toFixed(2); },
    onchange: (e) => { state.temperature = Number(e.target.value); redraw(); } });
  const seedInput = h("input", { id: "seed", type: "number", min: "0", step: "1", value: "0",
    onchange: (e) => { state.seed = Math.max(0, Math.floor(Number(e.target.value) || 0)); redraw(); } });

  root.append(
    h("h1", {}, c.name, ` v${c.version} `, badge(c.state)),
    c.description ? h("p", { class: "muted" }, c.description) : null,
    h("section", { class: "panel" },
      h("div", { class: "controls" },
        C ? h("label", {}, labels ? `context (${c.context_names[0].replace(/[_-]?[0-9A-Za-z]+$/, "")})` : `context (${C} values)`, contextPicker) : null,
        h("label", { title: "scales the base distribution's standard deviation" }, "temperature", tempSlider, tempValue),
        h("label", {}, "seed", seedInput)),
      h("p", { class: "note" },
        `${D} features, ${c.flow} flow, ${c.calibration ? c.calibration.size + " calibration rows" : "no calibration set"}. `,
        "Samples use the temperature, seed and context above; densities are the model's own (temperature 1).")));

  // -- 2-D: heat map with samples -------------------------------------------------------------
  const densityChart = h("div", { id: "density-chart", class: "chart" });
  const densityNote = h("p", { class: "note", id: "grid-mass" });
  const densityN = h("input", { id: "density-n", type: "number", min: "1", max: "20000", value: "600", onchange: () => drawDensity() });
  if (twoD) {
    root.append(h("section", { class: "panel", id: "density" },
      h("h2", {}, "Density and samples"),
      h("div", { class: "controls" }, h("label", {}, "samples", densityN)),
      densityChart, densityNote));
  }

  async function drawDensity() {
    const n = Math.max(1, Math.min(20000, Number(densityN.value) || 600));
    const s = await operation(name, "sample", withContext({ n, seed: state.seed, temperature: state.temperature }, 1));
    const xs = s.samples.map((r) => r[0]), ys = s.samples.map((r) => r[1]);
    const range = (v) => { const lo = Math.min(...v), hi = Math.max(...v), pad = 0.15 * (hi - lo || 1); return [lo - pad, hi + pad]; };
    const [x0, x1] = range(xs), [y0, y1] = range(ys);
    const dx = (x1 - x0) / GRID, dy = (y1 - y0) / GRID;
    const cx = Array.from({ length: GRID }, (_, i) => x0 + (i + 0.5) * dx);
    const cy = Array.from({ length: GRID }, (_, j) => y0 + (j + 0.5) * dy);
    const points = [];
    for (let j = 0; j < GRID; j++) for (let i = 0; i < GRID; i++) points.push([cx[i], cy[j]]);
    const lp = (await operation(name, "log_prob", withContext({ inputs: points }, points.length))).log_prob;
    const finite = lp.filter((v) => v !== null && Number.isFinite(v));
    const top = Math.max(...finite), floor = top - 12;
    let mass = 0;
    const cells = lp.map((v, k) => {
      const value = v === null ? -Infinity : v;
      mass += Math.exp(value) * dx * dy;
      return [k % GRID, Math.floor(k / GRID), Math.max(value, floor)];
    });
    state.grid = { cx, cy, dx, dy, lp: lp.map((v) => (v === null ? -Infinity : v)) };
    chart(densityChart, {
      animation: false,
      grid: { left: 60, right: 110, top: 20, bottom: 50 },
      tooltip: { trigger: "item", formatter: (p) => (p.seriesIndex === 0
        ? `x = (${fmt(cx[p.value[0]], 3)}, ${fmt(cy[p.value[1]], 3)})<br>log p = ${fmt(lp[p.value[1] * GRID + p.value[0]])}`
        : `sample (${fmt(p.value[0], 3)}, ${fmt(p.value[1], 3)})`) },
      xAxis: [{ type: "category", data: cx, show: false, position: "top" }, { type: "value", position: "bottom", axisLine: { onZero: false }, min: x0, max: x1, name: c.feature_names[0], nameLocation: "middle", nameGap: 28, axisLabel }],
      yAxis: [{ type: "category", data: cy, show: false, position: "right" }, { type: "value", position: "left", axisLine: { onZero: false }, min: y0, max: y1, name: c.feature_names[1], nameLocation: "middle", nameGap: 40, axisLabel }],
      visualMap: { min: floor, max: top, dimension: 2, seriesIndex: 0, calculable: true, right: 10, top: "middle",
        text: ["log p", ""], inRange: { color: VIRIDIS }, formatter: (v) => fmt(v, 3) },
      series: [
        { name: "log p", type: "heatmap", data: cells, xAxisIndex: 0, yAxisIndex: 0, progressive: 0 },
        { name: "samples", type: "scatter", data: s.samples, xAxisIndex: 1, yAxisIndex: 1, symbolSize: 4,
          itemStyle: { color: "rgba(255,255,255,0.85)", borderColor: "#111", borderWidth: 0.6 } },
      ],
    });
    densityChart.dataset.samples = String(s.samples.length);
    densityChart.dataset.mass = String(mass);
    densityNote.textContent = `${GRID}×${GRID} grid of log p over the samples' range (+15%), ${s.samples.length} samples overlaid; ` +
      `∫ p over the shown grid ≈ ${fmt(mass, 4)} (midpoint rule). Colours clip at 12 nats below the maximum.`;
  }

  // -- image-like: a grid of samples ----------------------------------------------------------
  const imageGrid = h("div", { id: "sample-grid", class: "images" });
  const imageN = h("input", { id: "image-n", type: "number", min: "1", max: "400", value: "32", onchange: () => drawImages() });
  if (shape) {
    root.append(h("section", { class: "panel", id: "samples" },
      h("h2", {}, "Samples"),
      h("div", { class: "controls" }, h("label", {}, "images", imageN),
        h("button", { type: "button", class: "secondary", onclick: () => { seedInput.value = String(state.seed + 1); state.seed += 1; redraw(); } }, "next seed")),
      imageGrid,
      h("p", { class: "note" }, `${shape[0]}×${shape[1]} images; dark = high value (0 to 16); under each, its log-density.`)));
  }

  async function drawImages() {
    const n = Math.max(1, Math.min(400, Math.floor(Number(imageN.value) || 32)));
    const body = withContext({ n, seed: state.seed, temperature: state.temperature, return_log_prob: true }, 1);
    const s = await operation(name, "sample", body);
    const named = c.feature_names.every((f) => f.startsWith("pixel_"));
    const all = s.samples.flat();
    const lo = named ? 0 : Math.min(...all), hi = named ? 16 : Math.max(...all);
    imageGrid.replaceChildren(...s.samples.map((row, i) => {
      const canvas = h("canvas", { "data-index": i });
      drawImage(canvas, row, shape, lo, hi);
      return h("figure", {}, canvas, h("figcaption", {}, fmt(s.log_prob[i], 3)));
    }));
    imageGrid.dataset.request = JSON.stringify(body);
  }

  // -- 1-D marginals --------------------------------------------------------------------------
  const marginalChart = h("div", { id: "marginal-chart", class: "chart small" });
  const featureSelect = h("select", { id: "marginal-feature", onchange: () => drawMarginal() },
    c.feature_names.map((f, i) => h("option", { value: i }, f)));
  if (shape) featureSelect.value = String(Math.floor(shape[0] / 2) * shape[1] + Math.floor(shape[1] / 2) - 1);  // a pixel near the centre
  const marginalNote = h("p", { class: "note", id: "marginal-note" });
  root.append(h("section", { class: "panel", id: "marginal" },
    h("h2", {}, "Marginal of one feature"),
    h("div", { class: "controls" }, h("label", {}, "feature", featureSelect)),
    marginalChart, marginalNote));
  let marginalSamples = null;

  async function drawMarginal(resample = false) {
    if (resample || !marginalSamples) {
      marginalSamples = (await operation(name, "sample", withContext({ n: MARGINAL_SAMPLES, seed: state.seed, temperature: state.temperature }, 1))).samples;
    }
    const k = Number(featureSelect.value);
    const values = marginalSamples.map((r) => r[k]);
    const { edges, counts } = histogram(values, 40);
    const w = edges[1] - edges[0];
    const rows = counts.map((n, i) => [edges[i], edges[i + 1], n / (values.length * w)]);
    const series = [barsSeries(`histogram of ${values.length} samples`, rows, "#9db4ea")];
    if (twoD && state.grid && state.temperature === 1) {
      const g = state.grid;
      const axis = k === 0 ? g.cx : g.cy;
      const line = axis.map((x, i) => {
        let p = 0;
        for (let j = 0; j < GRID; j++) p += Math.exp(k === 0 ? g.lp[j * GRID + i] : g.lp[i * GRID + j]) * (k === 0 ? g.dy : g.dx);
        return [x, p];
      });
      series.push({ type: "line", name: "exact marginal (∫ of p over the grid)", data: line, showSymbol: false, lineStyle: { color: PALETTE[1], width: 2 } });
    }
    chart(marginalChart, {
      animation: false, grid: { left: 60, right: 20, top: 40, bottom: 40 }, legend: { top: 0 }, tooltip: { trigger: "axis" },
      xAxis: { type: "value", name: c.feature_names[k], nameLocation: "middle", nameGap: 26, scale: true, axisLabel, axisLine: { onZero: false } },
      yAxis: { type: "value", name: "density", nameLocation: "middle", nameGap: 45, axisLabel, axisLine: { onZero: false } },
      series,
    });
    marginalChart.dataset.bins = String(rows.length);
    const mean = values.reduce((a, b) => a + b, 0) / values.length;
    const sd = Math.sqrt(values.reduce((a, b) => a + (b - mean) ** 2, 0) / values.length);
    marginalNote.textContent = `${c.feature_names[k]}: mean ${fmt(mean)}, sd ${fmt(sd)} over ${values.length} samples` +
      (twoD ? (state.temperature === 1 ? "; the line integrates the heat map's density over the other feature." : "; the exact marginal is drawn at temperature 1 only.") : ".");
  }

  // -- calibration histogram and threshold ----------------------------------------------------
  const calChart = h("div", { id: "calibration-chart", class: "chart small" });
  const alphaSelect = h("select", { id: "alpha", onchange: () => { drawCalibration(); } },
    [...new Set([...ALPHAS, c.anomaly_alpha])].sort((a, b) => a - b).map((a) => h("option", { value: a, selected: a === c.anomaly_alpha }, String(a))));
  const thresholdText = h("p", { class: "note", id: "threshold" });
  if (c.calibration) {
    root.append(h("section", { class: "panel", id: "calibration" },
      h("h2", {}, "Calibration log-densities and the anomaly threshold"),
      h("div", { class: "controls" }, h("label", {}, "α", alphaSelect)),
      calChart, thresholdText));
  }

  async function drawCalibration() {
    const alpha = Number(alphaSelect.value);
    const hist = c.calibration.histogram;
    const rows = hist.counts.map((n, i) => [hist.edges[i], hist.edges[i + 1], n]);
    const s = await operation(name, "score", withContext({ inputs: [new Array(D).fill(0)], alpha }, 1));
    const thr = s.threshold.log_prob;  // null: -inf, nothing can be flagged
    const maxCount = Math.max(...hist.counts);
    const series = [barsSeries(`${c.calibration.size} held-out log-densities`, rows, "#9db4ea")];
    if (thr !== null) {
      series.push({ type: "line", name: `threshold at α = ${alpha}`, data: [[thr, 0], [thr, maxCount * 1.05]], showSymbol: false,
        lineStyle: { color: "#c0362c", width: 2, type: "dashed" } });
    }
    chart(calChart, {
      animation: false, grid: { left: 50, right: 20, top: 40, bottom: 40 }, legend: { top: 0 }, tooltip: { trigger: "item" },
      xAxis: { type: "value", name: "log p", nameLocation: "middle", nameGap: 26, scale: true, axisLabel, axisLine: { onZero: false },
        min: Math.min(hist.edges[0], thr ?? Infinity), max: hist.edges[hist.edges.length - 1] },
      yAxis: { type: "value", name: "calibration rows", nameLocation: "middle", nameGap: 35, minInterval: 1, axisLine: { onZero: false } },
      series,
    });
    calChart.dataset.bars = String(rows.length);
    calChart.dataset.threshold = thr === null ? "-inf" : String(thr);
    thresholdText.textContent = thr === null
      ? `At α = ${alpha} nothing can be flagged: with m = ${c.calibration.size} calibration rows the smallest p-value is 1/(m+1).`
      : `At α = ${alpha} a row is flagged when log p < ${fmt(thr)} (its conformal p-value ≤ α); ` +
        `${hist.counts.length} bins of ${c.calibration.size} held-out rows.`;
  }

  // -- scoring pasted or uploaded rows --------------------------------------------------------
  const example = twoD ? "0, 1\n1, -0.5\n3, 3" : `${c.feature_names.slice(0, 4).join(",")},…  (one row per line, ${D} values)`;
  const rowsBox = h("textarea", { id: "rows-input", placeholder: example, spellcheck: "false" });
  if (twoD) rowsBox.value = example;
  const fileInput = h("input", { id: "rows-file", type: "file", accept: ".csv,.json,.txt,text/csv,application/json", onchange: async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    rowsBox.value = await file.text();
    scoreRows();
  } });
  const scoreOut = h("div", { id: "score-result" });
  root.append(h("section", { class: "panel", id: "score" },
    h("h2", {}, "Score rows"),
    h("p", { class: "note" }, `Paste rows (CSV with or without a header of feature names, or JSON: a list of rows or records, or {"inputs", "context"}), or upload a file. `,
      C ? `Rows without context values use the context chosen above.` : ""),
    rowsBox,
    h("div", { class: "controls" }, h("button", { id: "score-button", type: "button", onclick: () => scoreRows() }, "Score"),
      h("label", {}, "or upload", fileInput), c.calibration ? h("span", { class: "muted" }, "at the α chosen above") : null),
    scoreOut));

  async function scoreRows() {
    scoreOut.replaceChildren();
    let parsed;
    try { parsed = parseRows(rowsBox.value, c.feature_names, c.context_names); }
    catch (err) { scoreOut.append(errorBox(err)); return; }
    const n = parsed.inputs.length;
    const body = { inputs: parsed.inputs };
    if (C) body.context = parsed.context || Array.from({ length: n }, () => state.context);
    if (c.calibration) body.alpha = Number(alphaSelect.value);
    let s;
    try {
      s = c.calibration ? await operation(name, "score", body) : await operation(name, "log_prob", body);
    } catch (err) { scoreOut.append(errorBox(err)); return; }
    let explanations = null;
    if (await explainOperation()) {
      try { explanations = explanationRows(await explain(name, { inputs: body.inputs, context: body.context }), c.feature_names, n); }
      catch (err) { explanations = null; scoreOut.append(errorBox(err)); }
    }
    const preview = (row) => (Array.isArray(row) ? (row.length > 4 ? row.slice(0, 4).map((v) => fmt(v, 3)).join(", ") + ", …" : row.map((v) => fmt(v, 3)).join(", ")) : JSON.stringify(row));
    const head = ["#", "row", "log p", "score", "p-value", "flag"].concat(explanations ? ["explanation"] : []);
    scoreOut.append(
      c.calibration && s.threshold ? h("p", { class: "note" }, `threshold log p ${fmt(s.threshold.log_prob)} at α = ${s.threshold.alpha}`) : null,
      h("table", { id: "score-table" },
        h("thead", {}, h("tr", {}, head.map((x, i) => h("th", { class: i >= 2 && i <= 4 ? "num" : "" }, x)))),
        h("tbody", {}, parsed.inputs.map((row, i) => h("tr", { "data-flag": c.calibration ? String(s.is_anomaly[i]) : "" },
          h("td", {}, i + 1), h("td", {}, preview(row)),
          h("td", { class: "num lp" }, fmt(s.log_prob[i])),
          h("td", { class: "num" }, c.calibration ? fmt(s.score[i]) : "–"),
          h("td", { class: "num pv" }, c.calibration ? fmt(s.p_value[i], 3) : "–"),
          h("td", { class: "flag" }, c.calibration ? badge(s.is_anomaly[i] ? "flagged" : "ok") : "no calibration"),
          explanations ? h("td", { class: "explanation" }, explanations[i]) : null)))));
  }

  // -- redraw on control changes --------------------------------------------------------------
  // one request at a time: a page should not compete with the server's other clients for its queue
  async function redraw() {
    const jobs = [];
    if (twoD) jobs.push(drawDensity);
    if (shape) jobs.push(drawImages);
    jobs.push(() => drawMarginal(true));
    for (const job of jobs) {
      try { await job(); } catch (err) { root.append(errorBox(err)); }
    }
    root.dataset.drawn = String(Number(root.dataset.drawn || 0) + 1);
  }

  await redraw();
  if (c.calibration) await drawCalibration().catch((e) => root.append(errorBox(e)));
  if (twoD) await scoreRows();
  root.dataset.loaded = "true";
  return () => timers.forEach(clearTimeout);
}

/** Per-row text of an explain answer: the three largest per-feature contributions, when it has them. */
function explanationRows(answer, featureNames, n) {
  if (!answer || typeof answer !== "object") return null;
  const list = Object.values(answer).find((v) => Array.isArray(v) && v.length === n && v.every((r) => Array.isArray(r) || (r && typeof r === "object")));
  if (!list) return null;
  return list.map((r) => {
    const pairs = Array.isArray(r) ? r.map((v, j) => [featureNames[j], v]) : Object.entries(r);
    return pairs.filter(([, v]) => typeof v === "number").sort((a, b) => Math.abs(b[1]) - Math.abs(a[1])).slice(0, 3)
      .map(([f, v]) => `${f} ${v >= 0 ? "+" : "−"}${fmt(Math.abs(v), 3)}`).join(", ");
  });
}
