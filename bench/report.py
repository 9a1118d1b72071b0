"""The results file's human side: a markdown report and a PNG plot (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["markdown", "plot", "summary", "update_readme"]

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _f(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def _machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']['name']}" if m.get("gpu") else ", no GPU"
    return (f"{m['cpu']}, {m['cores']} cores{gpu}, {m['memory_gb']} GB; Python {m['python']}, torch {m['torch']} "
            f"({m['torch_threads']} threads), uvicorn {m['versions'].get('uvicorn')}; load generator: "
            f"{m.get('wrk') or 'python (bench/pyloadgen.py)'}")


def markdown(results: dict[str, Any], plot_name: str | None = None) -> str:
    """The report: machine, targets, then one table per scenario."""
    m = results["machine"]
    s = results["scenarios"]
    lines = [
        f"### flowserve benchmark, {results['date']} ({results['mode']} run, {results['device']})",
        "",
        f"Machine: {_machine_line(m)}. Load average at start: {', '.join(f'{v:.2f}' for v in m['load_average_at_start'])}.",
        f"Command: `{results['command']}`; "
        + (f"{results['wall_seconds']:.0f} s." if results.get("complete") else "**cut short: partial results**."),
        "",
        "#### Targets",
        "",
        "| target | figure | needs | met |",
        "| --- | ---: | ---: | :---: |",
    ]
    for t in results["targets"]:
        verdict = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        fig = "–" if t["figure"] is None else f"{t['figure']:.2f}{t['unit'] if t['unit'] != 'x' else '×'}"
        need = f"{t['op']} {t['threshold']:g}{t['unit'] if t['unit'] != 'x' else '×'}"
        lines.append(f"| {t['name']} ({t['detail']}) | {fig} | {need} | {verdict} |")
    lines += [
        "",
        "#### 1–2. One-row `log_prob`: flowserve (batching on / off) against the HTTP ceiling",
        "",
        "| model | concurrency | ceiling req/s | flowserve req/s | ratio | no-batching req/s | on/off | "
        "ceiling p50 / p99 ms | flowserve p50 / p99 ms | p99 ratio | no-batching p50 / p99 ms | rows per batch | "
        "failed | flowserve CPU (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by = {(r["model"], r["server"], r["concurrency"]): r for r in s["concurrency"]}
    for model in results["models"]:
        for c in results["plan"]["concurrencies"]:
            ceil, on, off = (by.get((model, k, c)) for k in ("ceiling", "flowserve", "flowserve-nobatch"))
            if not on:
                continue
            failed = sum(r["failed"] for r in (ceil, on, off) if r)
            lines.append(
                f"| {model} | {c} | {_f(ceil and ceil['rps'])} | {_f(on['rps'])} | "
                f"{_f(ceil and on['rps'] / ceil['rps'], 2)} | {_f(off and off['rps'])} | "
                f"{_f(off and on['rps'] / off['rps'], 1)} | "
                f"{_f(ceil and ceil['p50_ms'], 1)} / {_f(ceil and ceil['p99_ms'], 1)} | "
                f"{_f(on['p50_ms'], 1)} / {_f(on['p99_ms'], 1)} | {_f(ceil and on['p99_ms'] / ceil['p99_ms'], 2)} | "
                f"{_f(off and off['p50_ms'], 1)} / {_f(off and off['p99_ms'], 1)} | "
                f"{_f(on.get('mean_batch_rows'), 1)} | {failed} | "
                f"{_f(on['server_cores'], 2)} |"
            )
    gen = [r["generator_cores"] for r in s["concurrency"]]
    if gen:
        lines += ["", f"The load generator ({s['concurrency'][0]['generator']}, one thread) used at most "
                      f"{max(gen):.2f} of a core in any run (median {sorted(gen)[len(gen) // 2]:.2f})."]
    lines += [
        "",
        "#### 3–4. Bulk: 100,000-row requests against the model's in-process limit",
        "",
        "| model | operation | format | rows | seconds | rows/s | in-process limit rows/s | ratio | request MB | answer MB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in s["bulk"] + s["sample"]:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['op']} | {r['format']} | {r['rows']:,} | failed: {r['error'][:80]} "
                         f"| | {_f(r['limit_rows_per_s'])} | | {r['request_bytes'] / 1e6:.1f} | |")
            continue
        lines.append(
            f"| {r['model']} | {r['op']} | {r['format']} | {r['rows']:,} | {r['seconds']:.3f} | {_f(r['rows_per_s'])} | "
            f"{_f(r['limit_rows_per_s'])} | {r['ratio']:.2f} | {r['request_bytes'] / 1e6:.1f} | "
            f"{r['response_bytes'] / 1e6:.1f} |"
        )
    if s["mixed"]:
        lines += [
            "",
            f"#### 5. Mixed load: every operation at once ({s['mixed'][0]['concurrency']} connections each)",
            "",
            "| model | operation | rows per request | req/s | rows/s | p50 ms | p99 ms | p99 / ceiling's p99 at the same total concurrency | failed |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in s["mixed"]:
            lines.append(
                f"| {r['model']} | {r['op']} | {r['rows_per_request']} | {_f(r['rps'])} | {_f(r['rows_per_s'])} | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {_f(r.get('p99_ratio_to_ceiling'), 2)} | {r['failed']} |"
            )
    st = results.get("startup")
    if st:
        lines += ["", f"Start to ready: {st['ready_seconds']:.2f} s (median of {len(st['runs'])}); idle RSS "
                      f"{st['idle_rss_mb']:.0f} MB with models {', '.join(st['models'])}."]
    if plot_name:
        lines += ["", f"![throughput and p99 against concurrency]({plot_name})"]
    return "\n".join(lines) + "\n"


def _unit(t: dict) -> str:
    return "×" if t["unit"] == "x" else f" {t['unit']}"


def summary(results: dict[str, Any], plot_path: str | None, report_path: str | None) -> str:
    """The README block: machine, one line per kind of target (every model's figure), the plot."""
    from .targets import KINDS

    m = results["machine"]
    lines = [
        f"Latest run: {results['date']}, {results['mode']}, device `{results['device']}`, on {_machine_line(m)} "
        f"(load average at start {m['load_average_at_start'][0]:.2f})."
        + (f" Full report: [{report_path}]({report_path})." if report_path else ""),
        "",
        "| target | figure | needs | met |",
        "| --- | --- | ---: | :---: |",
    ]
    for kind, title in KINDS.items():
        group = [t for t in results["targets"] if t.get("kind") == kind]
        if not group:
            continue
        figures = ", ".join(
            ("" if t["model"] is None else f"{t['model']}{' ' + t['name'].split(' bulk ')[1].split(' ')[0] if kind.startswith('bulk') else ''} ")
            + ("–" if t["figure"] is None else f"{t['figure']:.2f}{_unit(t)}")
            for t in group
        )
        verdicts = {t["met"] for t in group}
        met = "yes" if verdicts == {True} else "**no**" if verdicts == {False} else "partly"
        lines.append(f"| {title} | {figures} | {group[0]['op']} {group[0]['threshold']:g}{_unit(group[0])} | {met} |")
    if plot_path:
        lines += ["", f"![throughput and p99 against concurrency]({plot_path})"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """Requests/s and p99 against concurrency, one column per model; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = results.get("models") or []
    if not results["scenarios"]["concurrency"]:
        return False
    fig, axes = plt.subplots(2, len(models), figsize=(max(6.0, 4.2 * len(models)), 7.5), squeeze=False, sharex=True)
    styles = {"ceiling": ("HTTP ceiling (no-op)", "tab:gray", "--"),
              "flowserve": ("flowserve", "tab:blue", "-"),
              "flowserve-nobatch": ("flowserve, max_batch_rows=1", "tab:red", ":")}
    for j, model in enumerate(models):
        for server, (label, color, ls) in styles.items():
            rows = sorted((r for r in results["scenarios"]["concurrency"]
                           if r["model"] == model and r["server"] == server), key=lambda r: r["concurrency"])
            if not rows:
                continue
            cs = [r["concurrency"] for r in rows]
            axes[0][j].plot(cs, [r["rps"] for r in rows], ls, marker="o", color=color, label=label)
            axes[1][j].plot(cs, [r["p99_ms"] for r in rows], ls, marker="o", color=color, label=label)
        axes[0][j].set_title(f"{model}: one-row log_prob")
        axes[1][j].set_xlabel("concurrency (connections)")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
        axes[1][j].set_yscale("log")
    axes[0][0].set_ylabel("requests / s")
    axes[1][0].set_ylabel("p99 latency (ms)")
    axes[0][0].legend(fontsize=8)
    m = results["machine"]
    gpu = f", {m['gpu']['name']}" if m.get("gpu") else ""
    fig.suptitle(f"flowserve, {results['date']} ({results['device']})\n{m['cpu']}, {m['cores']} cores{gpu}, "
                 f"torch {m['torch']}, load generator {results['generator']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the bench markers of ``readme``; False when it has none."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{block}{END}{tail}", encoding="utf-8")
    return True
