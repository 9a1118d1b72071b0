"""Peak memory of reading a lying ``.npz`` zip bomb (issue 9, item 4(a)).

``python -m bench.zip_bomb`` builds a 1.1 MiB ``.npz`` whose one member inflates to 1.1 GiB of
zeros while the zip directory says 1 KiB, reads it with the server's ``.npz`` reader under the
default 256 MiB body limit, and prints the answer and the process's peak RSS (``VmHWM``) before and
after. ``--old-ref REV`` reads it instead with the reader of an older commit (the file at
``service/api/binary.py`` or ``service/http/codecs/binary.py`` in ``REV``), for a before/after.
Run each in its own process: the peak only grows.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tests.test_body_limits import BOMB_BYTES, _deflate_zeros, zip_archive

LIMIT = 256 << 20


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reader(old_ref: str | None):
    if old_ref is None:
        from service.http.codecs import binary

        return binary
    for path in ("service/http/codecs/binary.py", "service/api/binary.py"):
        shown = subprocess.run(["git", "show", f"{old_ref}:{path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"no .npz reader in {old_ref}")
    module = Path(tempfile.mkdtemp()) / "old_binary.py"
    # its relative imports, as the modules are named now
    source = shown.stdout.replace("from .errors import", "from service.http.problems import")
    module.write_text(source.replace("from .", "from service.http.codecs."))
    spec = importlib.util.spec_from_file_location("service.http.codecs.old_binary", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-ref", help="read with the .npz reader of this git revision")
    args = ap.parse_args()
    data, crc = _deflate_zeros(BOMB_BYTES)
    body = zip_archive([("inputs.npy", data, 1024, crc, zipfile.ZIP_DEFLATED)])
    mod = reader(args.old_ref)
    before = peak_mib()
    try:
        mod.read_npz(body, LIMIT)
        answer = "read (no refusal)"
    except Exception as e:  # noqa: BLE001 - the answer is what we report
        answer = f"{type(e).__name__} {getattr(e, 'status', '')}: {str(e)[:120]}"
    print(f"{args.old_ref or 'this checkout'}: body {len(body) / 2**20:.1f} MiB -> {answer}; "
          f"peak RSS {before:.0f} MiB before, {peak_mib():.0f} MiB after")


if __name__ == "__main__":
    sys.exit(main())
