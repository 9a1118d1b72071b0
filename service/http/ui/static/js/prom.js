// The Prometheus text exposition format, parsed, and the few aggregations the Live page needs.

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function number(text) {
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

/** Map of sample name -> [{labels, value}] (histograms appear as their _bucket/_sum/_count samples). */
export function parse(text) {
  const out = new Map();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const l of m[2].matchAll(LABEL)) labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({ labels, value: number(m[3]) });
  }
  return out;
}

/** The sum of a sample's values over the series whose labels include `match`. */
export function total(samples, name, match = {}) {
  let s = 0;
  for (const { labels, value } of samples.get(name) || []) {
    if (Object.entries(match).every(([k, v]) => labels[k] === v)) s += value;
  }
  return s;
}

/** Cumulative bucket counts of a histogram summed over series: [[le, count]] ascending in le. */
export function buckets(samples, name, match = {}) {
  const byLe = new Map();
  for (const { labels, value } of samples.get(name + "_bucket") || []) {
    if (!Object.entries(match).every(([k, v]) => labels[k] === v)) continue;
    const le = number(labels.le);
    byLe.set(le, (byLe.get(le) || 0) + value);
  }
  return [...byLe.entries()].sort((a, b) => a[0] - b[0]);
}

/**
 * The q-quantile of the observations between two scrapes, from the difference of their cumulative
 * buckets, interpolated linearly inside the bucket as Prometheus's histogram_quantile does.
 * null when nothing was observed in between.
 */
export function quantile(q, now, before) {
  const prev = new Map(before);
  const delta = now.map(([le, c]) => [le, c - (prev.get(le) || 0)]);
  const n = delta.length ? delta[delta.length - 1][1] : 0;
  if (!(n > 0)) return null;
  const rank = q * n;
  let lower = 0, below = 0;
  for (const [le, c] of delta) {
    if (c >= rank) {
      if (le === Infinity) return lower;
      return lower + (le - lower) * ((rank - below) / Math.max(c - below, 1e-12));
    }
    lower = le; below = c;
  }
  return lower;
}

/** The labels of a sample's series, deduplicated by `key` labels. */
export function series(samples, name, keys) {
  const seen = new Map();
  for (const { labels } of samples.get(name) || []) {
    const k = keys.map((key) => labels[key]).join("\u0000");
    if (!seen.has(k)) seen.set(k, Object.fromEntries(keys.map((key) => [key, labels[key]])));
  }
  return [...seen.values()];
}
