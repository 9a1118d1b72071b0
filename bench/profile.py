"""Profile a loaded flowserve server with py-spy: where each thread's time goes.

``python -m bench.profile --model-dir models --model moons --concurrency 64 --seconds 10`` starts
``flowserve serve`` (default settings, plus any ``--env KEY=VALUE``), drives one-row ``log_prob``
(or ``--rows N`` rows per request) with the harness's load generator, samples every thread of the
server with py-spy (``pip install py-spy``) and prints the load figures and, per thread, the
functions with the most samples (self and inclusive). ``--raw FILE`` keeps the collapsed stacks
(open them in speedscope, or feed them to flamegraph.pl).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .bodies import rows_json
from .limits import load_model, realistic_rows
from .loadgen import Request, run_load, start_load
from .server import ServerProcess, flowserve_argv, free_port

__all__ = ["main", "summarise"]


def summarise(raw: str, top: int = 20) -> str:
    """Per-thread sample counts and the top self / inclusive frames of collapsed py-spy stacks."""
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[tuple[str, str]] = collections.Counter()
    inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].split(":", 1)[-1].strip() or frames[0]
        threads[thread] += n
        own[(thread, frames[-1])] += n
        for frame in set(frames[1:]):
            inclusive[(thread, frame)] += n
    total = sum(threads.values()) or 1
    out = [f"{total} samples"]
    for thread, n in threads.most_common():
        out.append(f"\n== {thread}: {n} samples ({100 * n / total:.0f}%)\n-- self")
        out += [f"{c:6d} {100 * c / n:5.1f}%  {f}" for (t, f), c in own.most_common() if t == thread][:top]
        out.append("-- inclusive")
        out += [f"{c:6d} {100 * c / n:5.1f}%  {f}" for (t, f), c in inclusive.most_common() if t == thread][:top]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--model", default="moons")
    p.add_argument("--op", default="log_prob", choices=["log_prob", "score", "inverse"])
    p.add_argument("--rows", type=int, default=1, help="rows per request")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--raw", type=Path, default=None, help="keep the collapsed stacks here")
    p.add_argument("--no-profile", action="store_true", help="only load the server (an A/B of --env settings)")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not args.no_profile and not Path(spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    env = dict(kv.split("=", 1) for kv in args.env)
    x = realistic_rows(load_model(args.model_dir, args.model), args.rows)
    request = Request(f"/v1/models/{args.model}/{args.op}", rows_json(x))
    port = free_port()
    raw = args.raw or Path(tempfile.mkstemp(prefix="bench-profile-", suffix=".txt")[1])
    with ServerProcess("flowserve", flowserve_argv(args.model_dir, "127.0.0.1", port), port, env=env) as server:
        run_load(server.url, request, args.concurrency, 2.0)  # warm-up
        before = server.cpu_seconds()
        load = start_load(server.url, request, args.concurrency, args.seconds)
        if not args.no_profile:
            spy_proc = subprocess.Popen(
                [spy, "record", "-p", str(server.proc.pid), "-d", str(max(1, int(args.seconds) - 1)),
                 "-r", str(args.rate), "--threads", "--nonblocking", "-f", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = load.result()
        cores = (server.cpu_seconds() - before) / result.seconds
        if not args.no_profile:
            spy_proc.wait()
    print(f"{args.model} {args.op} {args.rows} row(s), c={args.concurrency}, env {env or 'defaults'}: "
          f"{result.rps:.0f} req/s, p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, failed {result.failed}, "
          f"server {cores:.2f} cores, load generator {result.generator_cores:.2f} cores")
    if not args.no_profile:
        print(summarise(raw.read_text(), args.top))
        if args.raw is None:
            raw.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
