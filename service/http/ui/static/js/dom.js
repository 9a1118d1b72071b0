// Small DOM and number-formatting helpers.

/** h("div", {class: "x", onclick: f}, child, "text") -> an element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A number for people: 4 significant digits, scientific when tiny or huge, "–" when missing. */
export function fmt(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (!Number.isFinite(x)) return x > 0 ? "∞" : "−∞";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(Math.max(digits - 2, 1)).replace("-", "−");
  return Number(x.toPrecision(digits)).toString().replace("-", "−");
}

export function errorBox(err) {
  return h("div", { class: "error", role: "alert" }, String(err && err.message ? err.message : err));
}

export function badge(state) {
  return h("span", { class: `badge ${state}` }, state);
}

/** Dispose of the ECharts instances under `root` (before a page is replaced). */
export function disposeCharts(root) {
  if (!window.echarts) return;
  for (const el of root.querySelectorAll(".chart")) {
    const chart = window.echarts.getInstanceByDom(el);
    if (chart) chart.dispose();
  }
}
