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


def within_noise(lo: float | None, hi: float | None) -> bool:
    """Whether a ratio's p25–p75 range includes 1: no difference beyond the noise of the rounds."""
    return lo is not None and hi is not None and lo <= 1.0 <= hi


def speedup_plot(path: Path, names: list[str], series: list[dict], title: str) -> str | None:
    """Grouped bars: speedup over PyTorch's default per problem, one bar per series (dicts with ``label`` and
    lists ``median``, ``lo``, ``hi`` of speedups, None where missing), each with its p25–p75 range as an error
    bar. A bar whose range includes 1 is hatched and pale: that difference is noise, not a speedup or a loss.
    The legend sits outside the axes and the figure is cut to its contents, so nothing overlaps or is clipped.
    Returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed: no plot (pip install 'autosdpa[plot]')"
    n, k = len(names), len(series)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * n * max(k, 2) / 2 + 3), 5))
    w = 0.8 / max(k, 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    values = []
    for j, s in enumerate(series):
        for i in range(n):
            med, lo, hi = s["median"][i], s["lo"][i], s["hi"][i]
            if not med:
                continue
            noise = within_noise(lo, hi)
            x = i - 0.4 + w * (j + 0.5)
            err = [[max(0.0, med - lo)], [max(0.0, hi - med)]] if lo is not None and hi is not None else None
            ax.bar(x, med, w, yerr=err, capsize=2, color=colors[j % len(colors)], alpha=0.45 if noise else 1.0,
                   hatch="//" if noise else None, edgecolor="white" if noise else None, linewidth=0)
            if not noise:
                ax.annotate(f"{med:.2f}×", (x, hi if hi is not None else med), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=6)
            values += [v for v in (med, lo, hi) if v]
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(range(n)))
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
    if values and max(values) / max(min(values), 1e-9) > 4:
        ax.set_yscale("log")  # ratios far apart: equal factors get equal heights
    ax.set_ylabel("speedup over PyTorch's default\n(higher is faster)")
    ax.set_title(title, fontsize=9)
    handles = [Patch(color=colors[j % len(colors)], label=s["label"]) for j, s in enumerate(series)]
    handles += [Patch(facecolor="grey", alpha=0.45, hatch="//", edgecolor="white",
                      label="within noise: its p25–p75 includes 1"),
                plt.Line2D([], [], color="black", linewidth=0.8, linestyle="--", label="PyTorch's default (1.0)"),
                plt.Line2D([], [], color="black", marker="|", linestyle="", markersize=8,
                           label="error bar: p25–p75 of the\nper-round time ratio")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8,
              frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def _speedups(ratios: list[dict | None]) -> dict:
    """Time ratios (candidate / default: median, p25, p75) -> speedup lists (1 / ratio; p75 gives the low end)."""
    def inv(r, k):
        return 1 / r[k] if r and r.get(k) else None
    return {"median": [inv(r, "median") for r in ratios], "lo": [inv(r, "p75") for r in ratios],
            "hi": [inv(r, "p25") for r in ratios]}


def write_plot(path: Path, doc: dict) -> str | None:
    """Speedup over PyTorch's default per problem: autosdpa, and the best single backend of each problem."""
    rows = doc["results"]
    m = doc["machine"]
    series = [{"label": "autosdpa", **_speedups([r["autosdpa_vs_default"] for r in rows])},
              {"label": "fastest backend of each problem\n(oracle, timed alone)",
               **_speedups([r["oracle_vs_default"] for r in rows])}]
    title = (f"autosdpa sweep on {m['device_name']} ({m['device']}), torch {m['versions']['torch']}, "
             f"load {doc['loadavg_start'][0]:.1f}")
    return speedup_plot(path, [r["name"] for r in rows], series, title)


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
