// The Models page: every model with its state and version, and the card of each ready one.

import { card, listModels } from "../api.js";
import { badge, errorBox, fmt, h } from "../dom.js";

function names(list) {
  if (!list || !list.length) return "none";
  return list.length <= 6 ? list.join(", ") : `${list.slice(0, 3).join(", ")}, …, ${list.slice(-2).join(", ")}`;
}

function flowText(c) {
  const kw = (c.flow_config && c.flow_config.kwargs) || {};
  const parts = [c.flow || "?"];
  if (kw.transforms) parts.push(`${kw.transforms} transforms`);
  if (kw.hidden_features) parts.push(`hidden [${kw.hidden_features.join(", ")}]`);
  if (kw.bins) parts.push(`${kw.bins} bins`);
  return `${parts.join(" · ")} (${c.dtype})`;
}

/** The exactness checks of a card as rows: name, value, tolerance, pass. */
function exactnessRows(exactness) {
  const checks = (exactness && exactness.checks) || {};
  const label = { round_trip_x: "round trip x", round_trip_z: "round trip z", log_det_autograd: "log-det vs autograd", integral: "|∫ p − 1|" };
  return Object.entries(checks).map(([k, v]) =>
    h("tr", { "data-check": k },
      h("td", {}, label[k] || k, k === "integral" && v.integral !== undefined ? ` (∫ p = ${fmt(v.integral, 7)})` : ""),
      h("td", { class: "num" }, fmt(v.value, 3)),
      h("td", { class: "num" }, fmt(v.tolerance, 2)),
      h("td", {}, badge(v.pass ? "ok" : "failed"))));
}

function cardPanel(c) {
  const t = c.training || {};
  const cal = c.calibration;
  return h("section", { class: "panel model-card", "data-model": c.name },
    h("h2", {}, h("a", { href: `#/model/${encodeURIComponent(c.name)}` }, c.name), ` v${c.version} `, badge(c.state)),
    c.description ? h("p", { class: "muted" }, c.description) : null,
    h("dl", { class: "facts" },
      h("dt", {}, "features"), h("dd", { class: "features" }, `${c.features}: ${names(c.feature_names)}`),
      h("dt", {}, "context"), h("dd", {}, c.context_features ? `${c.context_features}: ${names(c.context_names)}` : "none"),
      h("dt", {}, "flow"), h("dd", { class: "flow" }, flowText(c)),
      h("dt", {}, "training"), h("dd", { class: "training" },
        `${t.rows ?? "?"} rows, ${t.epochs ?? "?"} epochs, ${fmt(t.seconds, 3)} s`),
      h("dt", {}, "held-out NLL / dim"), h("dd", { class: "nll" },
        t.test_nll_per_dim !== undefined
          ? `${fmt(t.test_nll_per_dim)} (Gaussian ${fmt(t.gaussian_test_nll_per_dim)})`
          : `${fmt(t.val_nll_per_dim)} (validation)`),
      h("dt", {}, "calibration"), h("dd", { class: "calibration-size" },
        cal ? `${cal.size} held-out log-densities, median ${fmt(cal.quantiles["0.5"])}` : "none (no anomaly scores)"),
      h("dt", {}, "anomaly α"), h("dd", {}, fmt(c.anomaly_alpha)),
      h("dt", {}, "device"), h("dd", {}, c.device),
      h("dt", {}, "sha256"), h("dd", {}, h("code", {}, c.sha256.slice(0, 16) + "…"))),
    h("h3", {}, "Exactness"),
    h("table", { class: "exactness" },
      h("thead", {}, h("tr", {}, h("th", {}, "check"), h("th", { class: "num" }, "value"),
        h("th", { class: "num" }, "tolerance"), h("th", {}, ""))),
      h("tbody", {}, exactnessRows(c.exactness))));
}

export async function renderModels(root, refreshNav) {
  let timer = null, stopped = false;
  const tableBody = h("tbody");
  const cards = h("div", { class: "grid3" });
  root.append(
    h("h1", {}, "Models"),
    h("section", { class: "panel" },
      h("table", { id: "models-table" },
        h("thead", {}, h("tr", {}, ["model", "version", "state", "features", "context", "flow", "device", "versions"]
          .map((x) => h("th", {}, x)))),
        tableBody)),
    cards);

  async function load() {
    const models = await listModels();
    tableBody.replaceChildren(...models.map((m) => h("tr", { "data-model": m.name },
      h("td", {}, h("a", { href: `#/model/${encodeURIComponent(m.name)}` }, m.name)),
      h("td", { class: "version" }, m.version ?? "–"),
      h("td", { class: "state" }, badge(m.state), m.error ? h("div", { class: "error" }, m.error) : null),
      h("td", {}, m.features ?? "–"), h("td", {}, m.context_features ?? "–"), h("td", {}, m.flow ?? "–"),
      h("td", {}, m.device), h("td", {}, (m.versions || []).join(", ")))));
    const ready = models.filter((m) => m.ready);
    const panels = await Promise.all(ready.map((m) => card(m.name).then(cardPanel, (err) => errorBox(err))));
    cards.replaceChildren(...panels);
    if (models.some((m) => m.state === "loading") && !stopped) {
      timer = setTimeout(() => { refreshNav(); load().catch((err) => root.append(errorBox(err))); }, 2000);
    }
    root.dataset.loaded = "true";
  }
  await load();
  return () => { stopped = true; clearTimeout(timer); };
}
