// ECharts option builders shared by the pages (the library is vendored: window.echarts).

export const PALETTE = ["#2f5fd0", "#d0682f", "#1b7f4b", "#8a3fc0", "#c0362c", "#2a9fb0"];
// viridis, 9 stops: perceptually uniform, readable in grey
export const VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"];

/** A chart on `el` (reusing an existing instance), with `option` set in full. */
export function chart(el, option) {
  const instance = window.echarts.getInstanceByDom(el) || window.echarts.init(el, null, { renderer: "canvas" });
  instance.setOption(option, true);
  return instance;
}

/**
 * A custom series of histogram bars: data rows [left edge, right edge, height], each drawn as a
 * rectangle from the x axis, so bins keep their exact widths on a value axis.
 */
export function barsSeries(name, rows, color) {
  return {
    type: "custom", name, data: rows, encode: { x: [0, 1], y: 2, tooltip: [0, 1, 2] },
    renderItem(params, api) {
      const a = api.coord([api.value(0), 0]);
      const b = api.coord([api.value(1), api.value(2)]);
      return {
        type: "rect",
        shape: { x: a[0], y: b[1], width: Math.max(b[0] - a[0] - 1, 1), height: a[1] - b[1] },
        style: { fill: color },
      };
    },
  };
}

/** Equal-width histogram of `values`: {edges, counts}. */
export function histogram(values, bins, lo, hi) {
  const finite = values.filter(Number.isFinite);
  lo = lo ?? Math.min(...finite);
  hi = hi ?? Math.max(...finite);
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const w = (hi - lo) / bins;
  const counts = new Array(bins).fill(0);
  for (const v of finite) {
    if (v < lo || v > hi) continue;
    counts[Math.min(bins - 1, Math.floor((v - lo) / w))] += 1;
  }
  const edges = Array.from({ length: bins + 1 }, (_, i) => lo + i * w);
  return { edges, counts };
}

export const axisLabel = { formatter: (v) => Number(v.toPrecision(3)).toString() };
