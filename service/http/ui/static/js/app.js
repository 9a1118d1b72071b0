// The dashboard's router: #/ (models), #/model/<name>, #/live. Pages render into <main id="page">.

import { listModels, setApiKey } from "./api.js";
import { disposeCharts, errorBox, h } from "./dom.js";
import { renderLive } from "./pages/live.js";
import { renderModel } from "./pages/model.js";
import { renderModels } from "./pages/models.js";

const page = document.getElementById("page");
let stopCurrent = null;

async function refreshNav() {
  const slot = document.getElementById("nav-models");
  try {
    const models = await listModels();
    slot.replaceChildren(...models.map((m) => h("a", { href: `#/model/${encodeURIComponent(m.name)}`, "data-page": `model:${m.name}` }, m.name)));
    document.getElementById("server-state").textContent =
      `${models.filter((m) => m.ready).length} of ${models.length} models ready`;
    return models;
  } catch (err) {
    document.getElementById("server-state").textContent = "server unreachable";
    return [];
  }
}

function markActive(key) {
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === key);
}

async function route() {
  if (stopCurrent) { stopCurrent(); stopCurrent = null; }
  disposeCharts(page);
  page.replaceChildren();
  for (const key of Object.keys(page.dataset)) delete page.dataset[key];
  const hash = decodeURIComponent(location.hash.replace(/^#/, "")) || "/";
  const parts = hash.split("/").filter(Boolean);
  try {
    if (parts[0] === "model" && parts[1]) {
      markActive(`model:${parts[1]}`);
      stopCurrent = await renderModel(page, parts[1]);
    } else if (parts[0] === "live") {
      markActive("live");
      stopCurrent = await renderLive(page);
    } else {
      markActive("models");
      stopCurrent = await renderModels(page, refreshNav);
    }
  } catch (err) {
    page.append(errorBox(err));
  }
  document.body.dataset.page = parts[0] || "models";
}

document.addEventListener("flowserve:auth", () => { document.getElementById("auth").hidden = false; });
document.getElementById("auth-save").addEventListener("click", () => {
  setApiKey(document.getElementById("auth-key").value.trim());
  document.getElementById("auth").hidden = true;
  refreshNav().then(route);
});
window.addEventListener("hashchange", route);
window.addEventListener("resize", () => {
  for (const el of page.querySelectorAll(".chart")) window.echarts.getInstanceByDom(el)?.resize();
});
refreshNav().then(() => { markActive(); return route(); });
