"""Writing a sweep document (``autosdpa.sweep.run_sweep``): JSON, a markdown table, a PNG, console lines."""
from __future__ import annotations

import json
from pathlib import Path


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _ratio(r: dict | None) -> str:
    """Median paired ratio with its interquartile range."""
    if not r:
        return "-"
    return f"{r['median']:.3f} ({r['p25']:.2f}–{r['p75']:.2f})"


def _timing(row: dict, name: str) -> str:
    t = row["timings_s"].get(name)
    if not t:
        return "-"
    return f"{_ms(t['median'])} ±{(t['p75'] - t['p25']) / 2 / t['median']:.0%}"


def _backends(row: dict) -> str:
    names = sorted(n.removeprefix("backend:") for n in row["timings_s"] if n.startswith("backend:"))
    return ", ".join(f"{n} {_timing(row, 'backend:' + n)}" for n in names) or "-"


def target_lines(doc: dict) -> list[str]:
    dev = doc["machine"]["device"]
    out = []
    for t in doc["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        where = "" if t["on_this_device"] else f" (a {t['applies'].upper()} target; shown for reference on {dev})"
        out.append(f"{t['target']}: goal {t['goal']}, measured {t['measured']}: {verdict}{where}")
    return out


def markdown(doc: dict) -> str:
    m, s = doc["machine"], doc["summary"]
    v = m["versions"]
    la0, la1 = doc["loadavg_start"], doc["loadavg_end"]
    lines = [f"# autosdpa sweep: {m['device_name']} ({m['device']})", "",
             f"{doc['date']}; torch {v['torch']}, python {v['python']}, {m['torch_threads']} threads, "
             f"{m['cpu_count']} cores; load average {la0[0]:.1f} at start, {la1[0]:.1f} at end"
             f"{' (**the machine was shared: timings are distorted**)' if max(la0[0], la1[0]) > 3 else ''}. "
             f"Tuning budget {doc['budget_s']:g} s per problem; ~{doc['seconds_per_problem']:g} s of "
             f"interleaved rounds per problem{'; --quick' if doc['quick'] else ''}{'; --dry (tiny sizes)' if doc['dry'] else ''}.",
             "", doc["method"], "",
             "| problem | default (PyTorch pick) | backends alone | autosdpa (pick) | autosdpa / default | "
             "of minima | autosdpa / oracle | regression | first sight |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        reg = "**yes**" if r["regression"] else "no"
        lines.append(
            f"| {r['name']} | {_timing(r, 'default')} ({r['pytorch_choice']}) | {_backends(r)} | "
            f"{_timing(r, 'autosdpa')} ({r['autosdpa_backend']}) | {_ratio(r['autosdpa_vs_default'])} | "
            f"{r['autosdpa_vs_default_of_minima']:.3f} | "
            f"{_ratio(r['autosdpa_vs_oracle'])} ({r['oracle']}) | {reg} | "
            f"{r['first_sight_s'] * 1e3:.0f} ms = {r['first_sight_calls']:.0f} calls |")
    h = doc["hot_path"]
    same = sum(r["autosdpa_backend"] == r["pytorch_choice"] for r in doc["results"])
    lines += ["", f"On {same} of {len(doc['results'])} problems autosdpa's pick is PyTorch's own pick, so the call "
              "goes to F.sdpa itself: there a ratio can differ from 1 only by the hot-path overhead and noise.",
              "", f"Geomean autosdpa / default: **{s['autosdpa_vs_default_geomean']:.3f}** "
              f"(speedup {s['speedup_over_default_geomean']:.3f}×; the per-problem oracle would give "
              f"{s['oracle_speedup_over_default_geomean'] or 0:.3f}×); of minima "
              f"{s['autosdpa_vs_default_of_minima_geomean']:.3f}. Geomean autosdpa / oracle: "
              f"**{s['autosdpa_vs_oracle_geomean'] or 0:.3f}** (worst {s['autosdpa_vs_oracle_worst'] or 0:.3f}). "
              f"Regressions beyond noise: **{len(s['regressions'])}**"
              f"{' (' + ', '.join(s['regressions']) + ')' if s['regressions'] else ''}.", "",
              f"Hot path ({h['case']}, winner {h['winner']}): F.sdpa {h['torch_us']:.2f} µs, autosdpa "
              f"{h['autosdpa_us']:.2f} µs: **{h['overhead_us']:.2f} µs** added per cache hit "
              f"(p25–p75 {h['overhead_p25_us']:.2f}–{h['overhead_p75_us']:.2f}; median of {h['rounds']} interleaved "
              f"paired differences, {h['calls_per_sample']} calls per sample).", "",
              "## Targets", "", "| target | applies to | goal | measured | |", "|---|---|---|---|---|"]
    for t in doc["targets"]:
        lines.append(f"| {t['target']} | {t['applies']} | {t['goal']} | {t['measured']} | "
                     f"{'met' if t['met'] else '**missed**'}{'' if t['on_this_device'] else ' (not this device)'} |")
    return "\n".join(lines) + "\n"


def write_plot(path: Path, doc: dict) -> str | None:
    """Speedup over PyTorch's default per problem (autosdpa and the oracle); a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install 'autosdpa[plot]')"
    rows = doc["results"]
    xs = list(range(len(rows)))
    ours = [1 / r["autosdpa_vs_default"]["median"] for r in rows]
    err = [[o - 1 / r["autosdpa_vs_default"]["p75"] for o, r in zip(ours, rows)],
           [1 / r["autosdpa_vs_default"]["p25"] - o for o, r in zip(ours, rows)]]
    orc = [1 / r["oracle_vs_default"]["median"] if r["oracle_vs_default"] else 0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(rows) + 3), 5))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], ours, w, yerr=err, capsize=2, label="autosdpa (error bar: p25–p75 of rounds)")
    ax.bar([x + w / 2 for x in xs], orc, w, label="best single backend (oracle)", alpha=0.7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="PyTorch default")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["name"] for r in rows], rotation=45, ha="right", fontsize=7)
    if max(ours + orc) / max(min(x for x in ours + orc if x > 0), 1e-9) > 4:
        ax.set_yscale("log")  # ratios far apart: equal factors get equal heights
    ax.set_ylabel("speedup over PyTorch default (higher: faster)")
    m = doc["machine"]
    ax.set_title(f"autosdpa sweep on {m['device_name']} ({m['device']}), torch {m['versions']['torch']}, "
                 f"load {doc['loadavg_start'][0]:.1f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(doc: dict, out_dir: str | Path, stem: str, *, plot: bool = True) -> tuple[list[Path], str | None]:
    """Write STEM.json, STEM.md and (if ``plot``) STEM.png under ``out_dir``; returns (paths, note)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(doc))
    note = write_plot(out / f"{stem}.png", doc) if plot else "plot skipped"
    if note is None:
        paths.append(out / f"{stem}.png")
    return paths, note
