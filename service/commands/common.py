"""What the ``models``, ``score``, ``explain`` and ``sample`` subcommands share.

- the *source* of a model: a running server (``--url``, through :class:`flowserve_client.Client`, the
  separate ``flowserve-client`` distribution of ``clients/python``, imported only there) or
  the model repository loaded in this process (``--model-dir``, through
  :class:`service.serving.inprocess.LocalModel`); both expose the same small interface, :class:`Source`;
- the arguments of the commands that read rows from a file (``score``, ``explain``) and the reading
  itself, from ``.csv`` / ``.npy`` / ``.npz`` files by the model's feature and context names, and writing named columns to ``.csv`` (or stdout), structured ``.npy``, or ``.npz``;
- one-line errors with exit status 2 (never a traceback) and a progress bar on stderr.

torch is imported only when a model is loaded in process, so ``--url`` calls start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "EPILOG_FORMATS",
    "CommandError",
    "Source",
    "add_rows_arguments",
    "add_source_arguments",
    "check_rows_arguments",
    "chunks",
    "guarded",
    "options",
    "open_source",
    "parse_context",
    "progress",
    "read_inputs",
    "rows_in_chunks",
    "read_rows",
    "write_columns",
]

#: exit status of every refused command (as argparse uses for bad arguments)
USAGE_ERROR = 2

EPILOG_FORMATS = """\
file formats:
  .csv  a header row naming the columns; the model's feature names are required (any order),
        columns named after its context features are read as context, any other column is an error
  .npy  a 2-D float array (rows x features), or a structured array whose fields are named as in .csv
  .npz  an array "inputs" (rows x features) and, for conditional models, "context" (rows x context)
"""


class CommandError(Exception):
    """A refusal to show the user as one line (exit status 2)."""


@contextlib.contextmanager
def options(**flags: str) -> Iterator[None]:
    """Run the edge's checks (:mod:`service.serving.validation`) on command-line options: a refusal
    becomes a :class:`CommandError` naming the option (``flags``: field name -> option), e.g.
    ``--alpha: Input should be less than 1``."""
    from service.serving.errors import InvalidField

    try:
        yield
    except InvalidField as e:
        field = e.errors[0]["loc"][1] if e.errors else None
        raise CommandError(f"{flags.get(field, field)}: {e.errors[0]['msg']}" if e.errors else e.detail) from None


def guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the errors a user can cause into ``flowserve CMD: error: ...`` on stderr and exit status 2."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except KeyboardInterrupt:
            return 130
        except Exception as e:  # noqa: BLE001 - re-raised below unless it is the user's error
            message = user_message(e, getattr(args, "url", None))
            if message is None:
                raise
        print(f"flowserve {args.command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR

    return wrapper


def user_message(e: Exception, url: str | None = None) -> str | None:
    """One line for an error the user caused (bad input, unknown model, server refusal); else ``None``."""
    import httpx

    artifact = sys.modules.get("service.model.artifact")  # loaded only where a model is loaded in process
    errors = sys.modules.get("flowserve_client.errors")  # loaded only where --url is used
    if errors is not None and isinstance(e, errors.FlowserveError):
        where = "; ".join(f"{'.'.join(map(str, err.get('loc', [])))}: {err.get('msg', '')}" for err in e.errors[:3])
        return f"server answered {e}" + (f" ({where})" if where else "")
    if isinstance(e, httpx.HTTPError):
        return f"cannot reach {url}: {e or type(e).__name__}"
    if isinstance(e, (CommandError, ValueError)) or (artifact is not None and isinstance(e, artifact.ArtifactError)):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    return None


# -- where the model lives ---------------------------------------------------------------------------
class Source(Protocol):
    """A model version to compute with, in process or on a server (results are float64 arrays)."""

    name: str
    version: int
    feature_names: list[str]
    context_names: list[str]

    def score(self, inputs: np.ndarray, context: np.ndarray | None, alpha: float | None) -> dict[str, Any]: ...

    def explain(self, inputs: np.ndarray, context: np.ndarray | None) -> dict[str, Any]: ...

    def sample(self, n: int, seed: int | None, temperature: float,
               context: np.ndarray | None) -> dict[str, np.ndarray]: ...


class RemoteModel:
    """A model on a flowserve server, pinned to one version so that every chunk uses the same one."""

    def __init__(self, client: Any, name: str, version: int | None) -> None:
        card = client.card(name, version)
        self.client = client
        self.name = str(card["name"])
        self.version = int(card["version"])
        self.feature_names = list(card["feature_names"])
        self.context_names = list(card["context_names"])

    def score(self, inputs: np.ndarray, context: np.ndarray | None, alpha: float | None) -> dict[str, Any]:
        return self.client.score(self.name, inputs, context=context, alpha=alpha, version=self.version)

    def explain(self, inputs: np.ndarray, context: np.ndarray | None) -> dict[str, Any]:
        return self.client.explain(self.name, inputs, context=context, version=self.version)

    def sample(self, n: int, seed: int | None, temperature: float,
               context: np.ndarray | None) -> dict[str, np.ndarray]:
        return self.client.sample(self.name, n, seed=seed, temperature=temperature, context=context,
                                  return_log_prob=True, version=self.version)


def add_rows_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The input file (``what``: e.g. "rows to score"), ``--model``, ``--context-file``, ``--output``,
    ``--batch-size`` and ``--quiet`` of a command that computes one answer row per input row."""
    parser.add_argument("file", type=Path, help=f"{what}: .csv, .npy or .npz")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--context-file", type=Path, default=None,
                        help="context rows for a conditional model (.csv/.npy/.npz, one row per input row, "
                             "or one row for all); else context columns of the CSV are used")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="OUT.csv, OUT.npy or OUT.npz (default: CSV on stdout)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per request or per pass (default: 4096)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary on stderr")


def check_rows_arguments(args: argparse.Namespace) -> None:
    """Refuse a ``--batch-size`` below 1 and a missing input file (before a model is loaded)."""
    if args.batch_size < 1:
        raise CommandError("--batch-size must be >= 1")
    if not args.file.is_file():
        raise CommandError(f"{args.file}: no such file")


def read_inputs(args: argparse.Namespace, source: "Source") -> tuple[np.ndarray, np.ndarray | None]:
    """The rows of ``args.file`` and their context (from its columns or ``--context-file``; one
    context row is repeated for every input row), checked against ``source``'s features and context."""
    x, context = read_rows(args.file, source.feature_names, source.context_names)
    if args.context_file is not None:
        if context is not None:
            raise CommandError(f"context given twice: by columns of {args.file} and by --context-file")
        context = read_context(args.context_file, source.context_names)
        if context.shape[0] == 1:
            context = np.repeat(context, x.shape[0], axis=0)
        if context.shape[0] != x.shape[0]:
            raise CommandError(f"{args.context_file}: {context.shape[0]} context rows for {x.shape[0]} input rows")
    if source.context_names and context is None:
        raise CommandError(f"model {source.name!r} is conditional: give its context {source.context_names} "
                           f"as columns of {args.file.name} or with --context-file")
    if not source.context_names and context is not None:
        raise CommandError(f"model {source.name!r} takes no context")
    return x, context


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url`` / ``--api-key`` (a server) or ``--model-dir`` / ``--device`` (in process), and ``--version``."""
    group = parser.add_argument_group("where the model is")
    group.add_argument("--url", default=os.environ.get("FLOWSERVE_URL"),
                       help="a running flowserve server (default: $FLOWSERVE_URL); without it the model "
                            "is loaded in this process")
    group.add_argument("--api-key", default=os.environ.get("FLOWSERVE_API_KEY"),
                       help="API key for --url (default: $FLOWSERVE_API_KEY)")
    group.add_argument("--model-dir", type=Path, default=Path(os.environ.get("FLOWSERVE_MODEL_DIR", "models")),
                       help="model repository when loading in process (default: $FLOWSERVE_MODEL_DIR or ./models)")
    group.add_argument("--device", default="cpu", help="torch device when loading in process (default: cpu)")
    group.add_argument("--version", type=int, default=None, help="model version (default: the latest)")


def client_for(args: argparse.Namespace) -> Any:
    """A :class:`flowserve_client.Client` for ``--url``; a :class:`CommandError` saying how to install it
    where the ``flowserve-client`` distribution is missing (the server itself does not need it)."""
    try:
        from flowserve_client import Client
    except ImportError as e:
        raise CommandError(f"--url needs the flowserve-client package ({e}); install it with "
                           "`pip install ./clients/python` from the flowserve repository (make setup does)") from None
    return Client(args.url, api_key=args.api_key, timeout=300.0)


@contextlib.contextmanager
def open_source(args: argparse.Namespace) -> Iterator[Source]:
    """The model ``args.model`` at ``args.version`` from ``--url`` or, without it, from ``--model-dir``."""
    if args.url:
        with client_for(args) as client:
            yield RemoteModel(client, args.model, args.version)
        return
    from service.serving.inprocess import LocalModel
    from service.model.repository import ModelRepository

    repo = ModelRepository(args.model_dir)
    if not repo.root.is_dir():
        raise CommandError(f"no model repository at {args.model_dir} (give --model-dir, or --url for a server)")
    names = repo.names()
    if args.model not in names:
        raise CommandError(f"no model {args.model!r} in {args.model_dir} (it has {names})")
    yield LocalModel(repo.load(args.model, args.version, device=args.device))


# -- chunks and progress -----------------------------------------------------------------------------
def chunks(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(total)``."""
    for start in range(0, total, size):
        yield slice(start, min(total, start + size))


def rows_in_chunks(args: argparse.Namespace, x: np.ndarray, context: np.ndarray | None,
                   compute: Callable[[np.ndarray, np.ndarray | None], dict[str, Any]]) -> list[dict[str, Any]]:
    """``compute(rows, context rows)`` over consecutive chunks of ``args.batch_size`` rows, in order,
    with a progress bar unless ``args.quiet``."""
    parts: list[dict[str, Any]] = []
    with progress(x.shape[0], args.quiet) as bar:
        for rows in chunks(x.shape[0], args.batch_size):
            parts.append(compute(x[rows], None if context is None else context[rows]))
            bar.update(rows.stop - rows.start)
    return parts


def progress(total: int, quiet: bool, unit: str = "rows") -> Any:
    """A tqdm bar on stderr, shown only on a terminal, after a second, and never with ``--quiet``."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, file=sys.stderr, delay=1.0,
                disable=quiet or not sys.stderr.isatty(), leave=False)


# -- reading rows ------------------------------------------------------------------------------------
def read_rows(path: Path, names: Sequence[str], context_names: Sequence[str] = (),
              key: str = "inputs") -> tuple[np.ndarray, np.ndarray | None]:
    """Rows ``(n, len(names))`` and, where the file holds them, context rows ``(n, C)`` from ``path``.

    ``key`` is the array of an ``.npz`` to read (its only array will do), and names the rows in messages.
    """
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, values = _read_csv(path)
        return _by_name(path, header, values, names, context_names, key)
    if suffix == ".npy":
        arr = _load_npy(path)
        if arr.dtype.names:
            columns = [np.asarray(arr[n], dtype=np.float64).reshape(-1) for n in arr.dtype.names]
            return _by_name(path, list(arr.dtype.names), np.stack(columns, axis=1), names, context_names, key)
        return _matrix(path, arr, len(names), key), None
    if suffix == ".npz":
        with _load_npz(path) as npz:
            files = list(npz.files)
            if key not in files and len(files) != 1:
                raise CommandError(f"{path}: expected an array named {key!r} (found {files})")
            rows = npz[key if key in files else files[0]]
            context = npz["context"] if context_names and "context" in files else None
        x = _matrix(path, rows, len(names), key)
        return x, None if context is None else _matrix(path, context, len(context_names), "context")
    raise CommandError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv, .npy or .npz")


def read_context(path: Path, context_names: Sequence[str]) -> np.ndarray:
    """Context rows ``(n, C)`` (or one row, for every input) from a ``.csv`` / ``.npy`` / ``.npz`` file."""
    if not context_names:
        raise CommandError("this model takes no context")
    return read_rows(path, context_names, key="context")[0]


def parse_context(text: str, context_names: Sequence[str]) -> np.ndarray:
    """One context row from ``"1,0.5"`` (in the model's order) or ``"label=3,dose=0.5"`` (by name)."""
    if not context_names:
        raise CommandError("this model takes no context")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all("=" in p for p in parts):
        given = {}
        for p in parts:
            key, _, value = p.partition("=")
            given[key.strip()] = value.strip()
        unknown = sorted(set(given) - set(context_names))
        missing = [n for n in context_names if n not in given]
        if unknown or missing:
            raise CommandError(f"--context: unknown {unknown}, missing {missing}; the model's context is {list(context_names)}")
        parts = [given[n] for n in context_names]
    if len(parts) != len(context_names):
        raise CommandError(f"--context: {len(parts)} values for {len(context_names)} context features {list(context_names)}")
    try:
        row = np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        raise CommandError(f"--context: not numbers: {text!r}") from None
    if not np.isfinite(row).all():
        raise CommandError(f"--context: NaN or infinity in {text!r}")
    return row.reshape(1, -1)


def _magic(path: Path, prefix: bytes, kind: str) -> None:
    with open(path, "rb") as f:
        if f.read(len(prefix)) != prefix:
            raise CommandError(f"{path}: not a {kind} file")


def _load_npy(path: Path) -> np.ndarray:
    _magic(path, b"\x93NUMPY", ".npy")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, which is never allowed; or a corrupt file
        raise CommandError(f"{path}: not a readable .npy file of numbers ({e})") from None


def _load_npz(path: Path) -> Any:
    _magic(path, b"PK", ".npz (zip)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CommandError(f"{path}: not a readable .npz file ({e})") from None
    if not hasattr(npz, "files"):
        raise CommandError(f"{path}: not an .npz archive")
    return npz


def _matrix(path: Path, arr: np.ndarray, width: int, what: str) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise CommandError(f"{path}: {what} must be numbers, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1 and width == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[1] != width:
        raise CommandError(f"{path}: {what} must be a 2-D array with {width} columns, got shape {arr.shape}")
    _check_finite(path, arr, what)
    return arr


def _check_finite(path: Path, arr: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise CommandError(f"{path}: {what} row {row}, column {col} is NaN or infinite")


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise CommandError(f"{path}: empty file (a header row naming the columns is required)") from None
        rows: list[list[float]] = []
        for line, record in enumerate(reader, start=2):
            if not record:
                continue
            if len(record) != len(header):
                raise CommandError(f"{path}: line {line} has {len(record)} fields, the header has {len(header)}")
            row = [_number(v) for v in record]
            if None in row:
                bad = row.index(None)
                raise CommandError(f"{path}: line {line}, column {header[bad]!r}: {record[bad]!r} is not a finite number")
            rows.append(row)
    values = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    return header, values


def _number(v: str) -> float | None:
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _by_name(path: Path, header: list[str], values: np.ndarray, names: Sequence[str],
             context_names: Sequence[str], key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The columns ``names`` (and, if present, all of ``context_names``) of a table with ``header``."""
    if len(set(header)) != len(header):
        raise CommandError(f"{path}: repeated column names in {header}")
    index = {name: i for i, name in enumerate(header)}
    missing = [n for n in names if n not in index]
    unknown = [n for n in header if n not in names and n not in context_names]
    if missing or unknown:
        what = [f"{label} column(s) {cols}" for label, cols in (("missing", missing), ("unknown", unknown)) if cols]
        expected = f"expected {key} columns {list(names)}"
        if context_names:
            expected += f" and context columns {list(context_names)}"
        raise CommandError(f"{path}: {', '.join(what)}; {expected}")
    x = values[:, [index[n] for n in names]]
    _check_finite(path, x, key)
    present = [n for n in context_names if n in index]
    if not present:
        return x, None
    if len(present) != len(context_names):
        absent = [n for n in context_names if n not in index]
        raise CommandError(f"{path}: context column(s) {absent} missing (has {present})")
    c = values[:, [index[n] for n in context_names]]
    _check_finite(path, c, "context")
    return x, c


# -- writing columns ---------------------------------------------------------------------------------
def write_columns(columns: dict[str, np.ndarray], output: Path | None) -> None:
    """Write equal-length named columns to ``output`` (``.csv``, ``.npy``, ``.npz``), or as CSV to stdout.

    ``.npy`` holds a structured array with one field per column (float64, or bool for flags), so
    ``np.load(f)["p_value"]`` works; ``.npz`` holds one array per column.
    """
    if output is None:
        _write_csv(columns, sys.stdout)
        sys.stdout.flush()
        return
    suffix = output.suffix.lower()
    if suffix == ".csv":
        with open(output, "w", newline="", encoding="utf-8") as f:
            _write_csv(columns, f)
    elif suffix == ".npy":
        dtype = [(k, v.dtype if v.dtype == np.bool_ else np.float64) for k, v in columns.items()]
        n = len(next(iter(columns.values())))
        table = np.empty(n, dtype=dtype)
        for k, v in columns.items():
            table[k] = v
        np.save(output, table, allow_pickle=False)
    elif suffix == ".npz":
        np.savez(output, **columns)
    else:
        raise CommandError(f"{output}: unsupported output type {suffix or '(none)'!r}; use .csv, .npy or .npz")


def _write_csv(columns: dict[str, np.ndarray], f: io.TextIOBase | Any) -> None:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(list(columns))
    cells = [_cells(v) for v in columns.values()]
    writer.writerows(zip(*cells))


def _cells(values: np.ndarray) -> list[str]:
    if values.dtype == np.bool_:
        return ["true" if v else "false" for v in values.tolist()]
    return [repr(v) for v in np.asarray(values, dtype=np.float64).tolist()]
