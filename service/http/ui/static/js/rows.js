// Rows a user pastes or uploads (CSV or JSON), turned into a /score body for one model.

function splitCsvLine(line) {
  const cells = [];
  let cur = "", quoted = false;
  for (let i = 0; i < line.length; i++) {
    const ch = line[i];
    if (quoted) {
      if (ch === '"' && line[i + 1] === '"') { cur += '"'; i++; }
      else if (ch === '"') quoted = false;
      else cur += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === "," || ch === ";" || ch === "\t") { cells.push(cur.trim()); cur = ""; }
    else cur += ch;
  }
  cells.push(cur.trim());
  return cells;
}

function numbersOf(cells, where) {
  return cells.map((c, j) => {
    const v = Number(c);
    if (c === "" || !Number.isFinite(v)) throw new Error(`${where}, column ${j + 1}: "${c}" is not a finite number`);
    return v;
  });
}

/**
 * Parse CSV text: an optional header of feature (and context) names, then one row per line,
 * separated by commas, semicolons, tabs or spaces. Returns {inputs, context|null}.
 */
export function parseCsv(text, featureNames, contextNames) {
  const lines = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  if (!lines.length) throw new Error("no rows: paste rows of numbers, one per line");
  const split = (l) => (/[,;\t]/.test(l) ? splitCsvLine(l) : l.split(/\s+/));
  let header = null;
  const first = split(lines[0]);
  if (first.some((c) => c !== "" && !Number.isFinite(Number(c)))) { header = first; lines.shift(); }
  const D = featureNames.length, C = contextNames.length;
  const inputs = [], context = [];
  lines.forEach((line, i) => {
    const cells = numbersOf(split(line), `row ${i + 1}`);
    if (header) {
      if (cells.length !== header.length) throw new Error(`row ${i + 1} has ${cells.length} values, the header ${header.length}`);
      const rec = Object.fromEntries(header.map((h, j) => [h, cells[j]]));
      const missing = featureNames.filter((f) => !(f in rec));
      if (missing.length) throw new Error(`the header lacks the feature(s) ${missing.slice(0, 5).join(", ")}`);
      inputs.push(featureNames.map((f) => rec[f]));
      if (C && contextNames.every((c) => c in rec)) context.push(contextNames.map((c) => rec[c]));
    } else if (C && cells.length === D + C) {
      inputs.push(cells.slice(0, D)); context.push(cells.slice(D));
    } else {
      inputs.push(cells);
    }
  });
  return { inputs, context: context.length === inputs.length && C ? context : null };
}

/** Parse JSON: a list of rows or records, or {"inputs": ..., "context"?: ...}. */
export function parseJson(text) {
  const value = JSON.parse(text);
  if (Array.isArray(value)) return { inputs: value, context: null };
  if (value && typeof value === "object" && Array.isArray(value.inputs)) {
    return { inputs: value.inputs, context: value.context ?? null };
  }
  throw new Error('JSON must be a list of rows, or an object with "inputs" (and "context")');
}

/** Either format, by its first character. */
export function parseRows(text, featureNames, contextNames) {
  const t = text.trim();
  if (t.startsWith("[") || t.startsWith("{")) return parseJson(t);
  return parseCsv(t, featureNames, contextNames);
}
