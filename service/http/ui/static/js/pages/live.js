// The Live page: requests/s, batch sizes, queue depth and latency from /metrics, every second.
//
// Counters and histograms are cumulative, so each figure is the difference between two scrapes
// divided by the time between them: requests/s = Δ flowserve_requests_total / Δt, mean batch size
// = Δ flowserve_batch_rows_sum / Δ flowserve_batch_rows_count, latency quantiles from the Δ of the
// flowserve_request_duration_seconds buckets (interpolated as Prometheus's histogram_quantile).

import { metricsText } from "../api.js";
import { PALETTE, chart } from "../charts.js";
import { errorBox, fmt, h } from "../dom.js";
import { buckets, parse, quantile, series, total } from "../prom.js";

const PERIOD_MS = 1000;
const KEEP = 120;  // points on the charts (two minutes)

function tile(id, label) {
  return h("div", { class: "tile" }, h("div", { class: "v", id }, "–"), h("div", { class: "k" }, label));
}

export async function renderLive(root) {
  root.append(
    h("h1", {}, "Live"),
    h("p", { class: "muted" }, `From /metrics, scraped every ${PERIOD_MS / 1000} s; rates are over the last interval.`),
    h("div", { class: "tiles" },
      tile("live-rps", "requests / s"), tile("live-rows", "rows / s"), tile("live-batch", "mean rows / batch"),
      tile("live-batch-requests", "mean requests / batch"), tile("live-queue", "queue depth (rows)"),
      tile("live-inflight", "in flight"), tile("live-p50", "p50 latency (ms)"), tile("live-p99", "p99 latency (ms)"),
      tile("live-total", "requests answered")),
    h("div", { class: "grid2" },
      h("section", { class: "panel" }, h("h2", {}, "Requests / s"), h("div", { id: "chart-rps", class: "chart small" })),
      h("section", { class: "panel" }, h("h2", {}, "Latency (ms)"), h("div", { id: "chart-latency", class: "chart small" })),
      h("section", { class: "panel" }, h("h2", {}, "Batch size (rows / batch)"), h("div", { id: "chart-batch", class: "chart small" })),
      h("section", { class: "panel" }, h("h2", {}, "Queue depth (rows) and requests in flight"), h("div", { id: "chart-queue", class: "chart small" }))),
    h("section", { class: "panel" }, h("h2", {}, "Per model and operation (since start)"),
      h("table", { id: "live-table" }, h("thead", {}, h("tr", {},
        ["model", "operation", "requests", "rows", "mean latency (ms)"].map((x, i) => h("th", { class: i >= 2 ? "num" : "" }, x)))),
        h("tbody"))));

  const history = [];
  let before = null, timer = null, stopped = false;
  const errorSlot = h("div");
  root.prepend(errorSlot);

  function lineOption(names, key, unit) {
    return {
      animation: false, grid: { left: 55, right: 20, top: 30, bottom: 30 }, legend: { top: 0 },
      tooltip: { trigger: "axis", valueFormatter: (v) => (v === null ? "–" : fmt(v, 3) + unit) },
      xAxis: { type: "time" }, yAxis: { type: "value", min: 0 },
      series: names.map((n, i) => ({ name: n, type: "line", showSymbol: false, connectNulls: false,
        lineStyle: { width: 2 }, itemStyle: { color: PALETTE[i] }, data: history.map((p) => [p.t, p[key[i]]]) })),
    };
  }

  async function tick() {
    try {
      const now = { t: Date.now(), m: parse(await metricsText()) };
      errorSlot.replaceChildren();
      const m = now.m;
      const point = { t: now.t, queue: total(m, "flowserve_queue_rows"), inflight: total(m, "flowserve_requests_in_flight") };
      document.getElementById("live-queue").textContent = fmt(point.queue);
      document.getElementById("live-inflight").textContent = fmt(point.inflight);
      document.getElementById("live-total").textContent = String(total(m, "flowserve_requests_total"));
      if (before) {
        const dt = (now.t - before.t) / 1000;
        const d = (name) => total(m, name) - total(before.m, name);
        point.rps = d("flowserve_requests_total") / dt;
        point.rows = d("flowserve_rows_total") / dt;
        const batches = d("flowserve_batch_rows_count");
        point.batch = batches > 0 ? d("flowserve_batch_rows_sum") / batches : null;
        point.batchRequests = batches > 0 ? d("flowserve_batch_requests_sum") / d("flowserve_batch_requests_count") : null;
        const nowB = buckets(m, "flowserve_request_duration_seconds"), beforeB = buckets(before.m, "flowserve_request_duration_seconds");
        const ms = (x) => (x === null ? null : 1000 * x);
        point.p50 = ms(quantile(0.5, nowB, beforeB));
        point.p99 = ms(quantile(0.99, nowB, beforeB));
        const count = d("flowserve_request_duration_seconds_count");
        point.mean = count > 0 ? (1000 * d("flowserve_request_duration_seconds_sum")) / count : null;
        history.push(point);
        if (history.length > KEEP) history.shift();
        document.getElementById("live-rps").textContent = fmt(point.rps, 3);
        document.getElementById("live-rows").textContent = fmt(point.rows, 3);
        document.getElementById("live-batch").textContent = fmt(point.batch, 3);
        document.getElementById("live-batch-requests").textContent = fmt(point.batchRequests, 3);
        document.getElementById("live-p50").textContent = fmt(point.p50, 3);
        document.getElementById("live-p99").textContent = fmt(point.p99, 3);
        chart(document.getElementById("chart-rps"), lineOption(["requests / s", "rows / s"], ["rps", "rows"], ""));
        chart(document.getElementById("chart-latency"), lineOption(["p50", "p99", "mean"], ["p50", "p99", "mean"], " ms"));
        chart(document.getElementById("chart-batch"), lineOption(["rows / batch", "requests / batch"], ["batch", "batchRequests"], ""));
        chart(document.getElementById("chart-queue"), lineOption(["queue rows", "in flight"], ["queue", "inflight"], ""));
      }
      const rows = series(m, "flowserve_requests_total", ["model", "operation"]).map(({ model, operation }) => {
        const count = total(m, "flowserve_request_duration_seconds_count", { model, operation });
        const sum = total(m, "flowserve_request_duration_seconds_sum", { model, operation });
        return h("tr", { "data-model": model, "data-operation": operation },
          h("td", {}, model), h("td", {}, operation),
          h("td", { class: "num requests" }, String(total(m, "flowserve_requests_total", { model, operation }))),
          h("td", { class: "num" }, String(total(m, "flowserve_rows_total", { model, operation }))),
          h("td", { class: "num" }, count > 0 ? fmt((1000 * sum) / count, 3) : "–"));
      });
      root.querySelector("#live-table tbody").replaceChildren(...rows);
      root.dataset.ticks = String(Number(root.dataset.ticks || 0) + 1);
      before = now;
    } catch (err) {
      errorSlot.replaceChildren(errorBox(err));
    }
    if (!stopped) timer = setTimeout(tick, PERIOD_MS);
  }
  await tick();
  return () => { stopped = true; clearTimeout(timer); };
}
