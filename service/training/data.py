r"""Training data: reading a file, choosing its columns, refusing bad data, splitting it.

A data file is one of

- ``.csv`` with a header row (the header gives the column names);
- ``.npy`` holding one 2-D numeric array (columns named ``x0 .. x{D-1}``);
- ``.npz`` holding either one 2-D array, or arrays named ``x`` (or ``inputs``, as ``flowserve
  score`` reads) and ``context`` (columns ``x0 ..`` and ``c0 ..``).

Nothing is ever unpickled (``allow_pickle=False``). Columns are chosen by name or by 0-based index
(``--features``, ``--context``); by default every column not taken as context is a feature.

:func:`validate` refuses, before any training and with a message naming the column and row, data
with NaN or infinity, non-numeric values, a constant feature column or too few rows.
:func:`dequantize` turns integer data into continuous data, :math:`x + u`, :math:`u \sim U(0, 1)^D`,
so that a density (not a probability mass) can be fitted. :func:`split` shuffles rows with a seed
into train / validation / calibration parts (70 / 15 / 15, the calibration part at most 10,000 rows).

Bounded features (``--bounds``): :func:`parse_bounds` reads ``LOW:HIGH`` (every feature) or
``name=LOW:HIGH,...`` (the named features) into per-feature arrays, NaN where unbounded;
:func:`check_bounds` refuses a row whose bounded feature is not strictly inside its interval (the
model's density is zero on the bounds themselves and outside), naming the row and column; and
:func:`unbound_rows` is the logit :math:`\log(x - a) - \log(b - x)` the model applies first, on
which the standardisation is chosen.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MAX_CALIBRATION_ROWS",
    "DataError",
    "Dataset",
    "Split",
    "check_bounds",
    "check_integer",
    "dequantize",
    "load_dataset",
    "min_rows",
    "parse_bounds",
    "parse_columns",
    "split",
    "unbound_rows",
    "validate",
]

#: fractions of the rows kept for validation (early stopping) and calibration (held-out scores)
VALIDATION_FRACTION = 0.15
CALIBRATION_FRACTION = 0.15
MAX_CALIBRATION_ROWS = 10_000


class DataError(ValueError):
    """The data cannot be trained on; the message says which column or row and why."""


@dataclass(frozen=True)
class Dataset:
    """Feature rows ``x`` ``(N, D)`` and optional context rows ``(N, C)``, float64, with column names."""

    x: np.ndarray
    context: np.ndarray | None
    feature_names: list[str]
    context_names: list[str]
    source: str = ""

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Split:
    """Row indices of the three parts of a data set (disjoint, together all rows)."""

    train: np.ndarray
    validation: np.ndarray
    calibration: np.ndarray


# -- reading ---------------------------------------------------------------------------------------
def parse_columns(text: str | None) -> list[str] | None:
    """``"a,b, c"`` → ``["a", "b", "c"]``; ``None`` or empty → ``None``."""
    if text is None:
        return None
    cols = [c.strip() for c in text.split(",")]
    if not any(cols):
        return None
    if "" in cols:
        raise DataError(f"empty column name in {text!r}")
    return cols


def _select(names: list[str], wanted: list[str], flag: str, source: str) -> list[int]:
    """Indices of ``wanted`` columns among ``names``: by name first, else by 0-based index."""
    out: list[int] = []
    for w in wanted:
        if w in names:
            idx = names.index(w)
        elif w.lstrip("-").isdigit() and -len(names) <= int(w) < len(names):
            idx = int(w) % len(names)
        else:
            raise DataError(f"{source}: {flag} names unknown column {w!r}; the columns are {names}")
        if idx in out:
            raise DataError(f"{source}: {flag} names column {names[idx]!r} twice")
        out.append(idx)
    return out


def _read_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """Parse a CSV with a header into a float64 array; refuse a non-numeric cell by row and column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path.name}: the file is empty (a header row is needed)") from None
        names = [h.strip() for h in header]
        if not names or any(not n for n in names):
            raise DataError(f"{path.name}: the header row has an empty column name: {header}")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"{path.name}: the header repeats column names {dup}")
        if all(_is_number(n) for n in names):
            raise DataError(f"{path.name}: the first row {names} looks like data; a header row with column names is needed")
        rows: list[list[float]] = []
        for line_no, raw in enumerate(reader, start=2):
            if not raw or all(not c.strip() for c in raw):
                continue
            if len(raw) != len(names):
                raise DataError(f"{path.name}: line {line_no} has {len(raw)} values, the header has {len(names)}")
            row = []
            for name, cell in zip(names, raw):
                try:
                    row.append(float(cell))
                except ValueError:
                    raise DataError(
                        f"{path.name}: column {name!r}, line {line_no}: {cell.strip()!r} is not a number"
                    ) from None
            rows.append(row)
    data = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))
    return data, names


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numeric(arr: np.ndarray, what: str) -> np.ndarray:
    """A 2-D float64 copy of a numeric array (bool, int, uint, float); refuse anything else."""
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what} has dtype {arr.dtype}, which is not numeric")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"{what} must be 2-D (rows × columns), it has shape {arr.shape}")
    return np.asarray(arr, dtype=np.float64)


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``.npy`` or ``.npz`` without pickle: the data array and, for ``.npz``, an optional context."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path.name}: not a readable {path.suffix} file (pickled objects are refused): {e}") from None
    if isinstance(loaded, np.ndarray):
        return _numeric(loaded, f"{path.name}"), None
    with loaded:
        keys = list(loaded.files)
        try:
            if len(keys) == 1:
                return _numeric(loaded[keys[0]], f"{path.name}[{keys[0]!r}]"), None
            main = "x" if "x" in keys else "inputs"
            if main in keys and set(keys) <= {main, "context"}:
                x = _numeric(loaded[main], f"{path.name}[{main!r}]")
                c = _numeric(loaded["context"], f"{path.name}['context']") if "context" in keys else None
                return x, c
        except ValueError as e:  # an object array inside the archive
            raise DataError(f"{path.name}: {e} (pickled objects are refused)") from None
    raise DataError(
        f"{path.name}: an .npz must hold one array, or arrays named 'x' (or 'inputs') and 'context'; it holds {keys}"
    )


def load_dataset(
    path: Path | str,
    features: list[str] | None = None,
    context: list[str] | None = None,
) -> Dataset:
    """Read ``path`` and pick its feature and context columns (by name or 0-based index).

    For an ``.npz`` holding ``x`` and ``context``, ``features`` picks columns of ``x`` and
    ``context`` columns of the ``context`` array; otherwise both pick columns of the one table.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table, names = _read_csv(path)
        ctx_table, ctx_names = None, None
    elif suffix in (".npy", ".npz"):
        table, ctx_table = _read_arrays(path)
        names = [f"x{i}" for i in range(table.shape[1])]
        ctx_names = None if ctx_table is None else [f"c{i}" for i in range(ctx_table.shape[1])]
    else:
        raise DataError(f"{path.name}: unsupported file type {path.suffix!r}; use .csv (with a header), .npy or .npz")

    if ctx_table is not None:
        if ctx_table.shape[0] != table.shape[0]:
            raise DataError(f"{path.name}: 'x' has {table.shape[0]} rows but 'context' has {ctx_table.shape[0]}")
        assert ctx_names is not None
        c_idx = _select(ctx_names, context, "--context", path.name) if context else list(range(len(ctx_names)))
        x_idx = _select(names, features, "--features", path.name) if features else list(range(len(names)))
        c_data, c_names = ctx_table[:, c_idx], [ctx_names[i] for i in c_idx]
    else:
        c_idx = _select(names, context, "--context", path.name) if context else []
        if features:
            x_idx = _select(names, features, "--features", path.name)
            if both := sorted(set(x_idx) & set(c_idx)):
                raise DataError(f"{path.name}: columns {[names[i] for i in both]} are chosen both as features and as context")
        else:
            x_idx = [i for i in range(len(names)) if i not in c_idx]
        c_data, c_names = (table[:, c_idx], [names[i] for i in c_idx]) if c_idx else (None, [])
    if not x_idx:
        raise DataError(f"{path.name}: no feature columns are left (all columns are context)")
    return Dataset(
        x=np.ascontiguousarray(table[:, x_idx]),
        context=None if c_data is None else np.ascontiguousarray(c_data),
        feature_names=[names[i] for i in x_idx],
        context_names=c_names,
        source=path.name,
    )


# -- checking --------------------------------------------------------------------------------------
def min_rows(features: int) -> int:
    """Rows needed: 40, and enough that the training part (70%) has ``2·(D + 1)`` rows."""
    return max(40, math.ceil(2 * (features + 1) / (1 - VALIDATION_FRACTION - CALIBRATION_FRACTION)))


def _check_finite(values: np.ndarray, names: list[str], what: str, source: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        kind = "NaN" if np.isnan(values[row, col]) else "infinity"
        count = int(bad.sum())
        raise DataError(
            f"{source}: {what} column {names[col]!r}, data row {row + 1} holds {kind}"
            f" ({count} non-finite value{'s' if count > 1 else ''} in all); remove or impute them"
        )


def validate(data: Dataset, dequantizing: bool = False) -> None:
    """Refuse data that cannot be trained on: non-finite values, too few rows, a constant feature.

    A constant integer column is accepted when ``dequantizing``: ``x + u`` is uniform on a unit cell.
    Rows are numbered from 1 in data order (in a CSV, data row ``r`` is on line ``r + 1``).
    """
    src = data.source or "data"
    _check_finite(data.x, data.feature_names, "feature", src)
    if data.context is not None:
        _check_finite(data.context, data.context_names, "context", src)
    need = min_rows(data.x.shape[1])
    if data.rows < need:
        raise DataError(
            f"{src}: {data.rows} rows is too few; {data.x.shape[1]} feature(s) need at least {need} rows "
            f"(70% train with at least 2·(features + 1) rows, 15% validation, 15% calibration)"
        )
    spread = data.x.max(axis=0) - data.x.min(axis=0)
    if not dequantizing and (spread == 0).any():
        col = int(np.flatnonzero(spread == 0)[0])
        raise DataError(
            f"{src}: feature column {data.feature_names[col]!r} is constant ({data.x[0, col]:g} in every row); "
            "a density over it does not exist: drop it (or pass --dequantize for integer data)"
        )


def check_integer(data: Dataset) -> None:
    """Refuse feature values that are not integers (dequantization is for integer data)."""
    frac = data.x != np.round(data.x)
    if frac.any():
        row, col = map(int, np.argwhere(frac)[0])
        raise DataError(
            f"{data.source or 'data'}: --dequantize needs integer data, but feature column "
            f"{data.feature_names[col]!r}, data row {row + 1} is {data.x[row, col]:g}"
        )


def dequantize(data: Dataset, seed: int) -> Dataset:
    r"""``x + u`` with ``u ~ U(0, 1)`` drawn from ``seed``: integer data made continuous.

    The fitted density is then the density of ``x + u``; integrating it over the unit cell
    ``[k, k + 1)`` gives the probability of the integer value ``k``. Refuses non-integer columns.
    """
    check_integer(data)
    noise = np.random.default_rng(seed).uniform(0.0, 1.0, size=data.x.shape)
    return Dataset(data.x + noise, data.context, data.feature_names, data.context_names, data.source)


# -- splitting -------------------------------------------------------------------------------------
def split(rows: int, seed: int) -> Split:
    """Shuffle ``rows`` indices with ``seed`` into 70 / 15 / 15 % (calibration at most 10,000)."""
    perm = np.random.default_rng(seed).permutation(rows)
    n_cal = min(MAX_CALIBRATION_ROWS, max(1, round(CALIBRATION_FRACTION * rows)))
    n_val = max(1, round(VALIDATION_FRACTION * rows))
    if rows - n_cal - n_val < 1:
        raise DataError(f"{rows} rows cannot be split into train, validation and calibration parts")
    return Split(
        train=np.sort(perm[n_cal + n_val :]),
        validation=np.sort(perm[n_cal : n_cal + n_val]),
        calibration=np.sort(perm[:n_cal]),
    )


# -- bounds ----------------------------------------------------------------------------------------
def _interval(text: str, what: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = float(low), float(high)
    except ValueError:
        raise DataError(f"--bounds: {what} {text!r} is not LOW:HIGH (two numbers, e.g. 0:17)") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise DataError(f"--bounds: {what} {text!r} must be finite numbers")
    if not a < b:
        raise DataError(f"--bounds: {what} {text!r}: LOW must be below HIGH")
    return a, b


def parse_bounds(text: str | None, feature_names: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """``"LOW:HIGH"`` (all features) or ``"name=LOW:HIGH,..."`` → per-feature ``(lower, upper)``, NaN where unbounded.

    ``None`` or an empty text → ``None`` (no bounds). Names may also be 0-based feature indices.
    """
    if text is None or not text.strip():
        return None
    d = len(feature_names)
    lower, upper = np.full(d, np.nan), np.full(d, np.nan)
    if "=" not in text:
        a, b = _interval(text.strip(), "the interval")
        lower[:], upper[:] = a, b
        return lower, upper
    for item in text.split(","):
        name, sep, interval = item.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise DataError(f"--bounds: {item.strip()!r} is not NAME=LOW:HIGH")
        (j,) = _select(feature_names, [name], "--bounds", "features")
        if not np.isnan(lower[j]):
            raise DataError(f"--bounds names feature {feature_names[j]!r} twice")
        lower[j], upper[j] = _interval(interval.strip(), f"feature {feature_names[j]!r}:")
    return lower, upper


def check_bounds(data: Dataset, lower: np.ndarray, upper: np.ndarray, dequantized: bool = False) -> None:
    """Refuse rows whose bounded features are not strictly inside ``(lower, upper)`` (NaN: unbounded)."""
    bounded = ~np.isnan(lower)
    bad = bounded & ((data.x <= lower) | (data.x >= upper))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        count = int(bad.any(axis=1).sum())
        value = "x + u = " if dequantized else ""
        raise DataError(
            f"{data.source or 'data'}: feature column {data.feature_names[col]!r}, data row {row + 1} is "
            f"{value}{data.x[row, col]:.17g}, not strictly inside its bounds ({lower[col]:g}, {upper[col]:g})"
            f" ({count} row{'s' if count > 1 else ''} in all); the density of a bounded feature is zero on"
            " and outside its bounds: widen --bounds"
            + (" (dequantized integers k in [LOW, HIGH - 1] lie inside LOW:HIGH)" if dequantized else "")
        )


def unbound_rows(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    r""":math:`y = \log(x - a) - \log(b - x)` for bounded features (``lower`` not NaN), ``x`` elsewhere."""
    bounded = ~np.isnan(lower)
    a, b = np.where(bounded, lower, 0.0), np.where(bounded, upper, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.log(x - a) - np.log(b - x)
    return np.where(bounded, y, x)
