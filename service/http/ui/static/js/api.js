// The public HTTP API of flowserve, as the dashboard calls it (same origin, JSON bodies).

const KEY_STORAGE = "flowserve.apiKey";

/** An answer that was not 2xx: its status and the RFC 9457 problem the server sent. */
export class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem && (problem.detail || problem.title);
    const fields = problem && Array.isArray(problem.errors)
      ? problem.errors.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("\n") : "";
    super(`${status}${detail ? ": " + detail : ""}${fields ? "\n" + fields : ""}`);
    this.status = status;
    this.problem = problem;
  }
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
}

function headers(json) {
  const h = { accept: "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) h.authorization = `Bearer ${key}`;
  if (json) h["content-type"] = "application/json";
  return h;
}

const RETRIES = 3;  // 503 answers (queue full, overloaded) are retried after their Retry-After

async function call(method, path, body) {
  let response;
  for (let attempt = 0; ; attempt++) {
    response = await fetch(path, {
      method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status !== 503 || attempt >= RETRIES) break;
    const wait = Math.min(5, Number(response.headers.get("retry-after")) || 1);
    await new Promise((resolve) => setTimeout(resolve, 1000 * wait));
  }
  const text = await response.text();
  if (!response.ok) {
    let problem = null;
    try { problem = JSON.parse(text); } catch { problem = { detail: text.slice(0, 200) }; }
    if (response.status === 401 || response.status === 403) document.dispatchEvent(new CustomEvent("flowserve:auth"));
    throw new ApiError(response.status, problem);
  }
  return text ? JSON.parse(text) : null;
}

export const listModels = () => call("GET", "/v1/models").then((b) => b.models);
export const card = (name) => call("GET", `/v1/models/${encodeURIComponent(name)}`);
export const operation = (name, op, body) => call("POST", `/v1/models/${encodeURIComponent(name)}/${op}`, body);

export async function metricsText() {
  const response = await fetch("/metrics", { headers: { accept: "text/plain" } });
  if (!response.ok) throw new ApiError(response.status, null);
  return response.text();
}

let explainPath = undefined;

/**
 * The path template of an `explain` operation when this server documents one in its OpenAPI
 * document, else null. Asking the document (rather than calling a path that may not exist) keeps
 * the browser console free of 404s on servers without it.
 */
export async function explainOperation() {
  if (explainPath !== undefined) return explainPath;
  explainPath = null;
  try {
    const doc = await call("GET", "/openapi.json");
    for (const [path, item] of Object.entries(doc.paths || {})) {
      if (/^\/v1\/models\/\{[^}/]+\}\/explain$/.test(path) && item.post) { explainPath = path; break; }
    }
  } catch { explainPath = null; }
  return explainPath;
}

export async function explain(name, body) {
  const template = await explainOperation();
  if (!template) return null;
  const path = template.replace(/\{[^}/]+\}/, encodeURIComponent(name));
  return call("POST", path, body);
}
