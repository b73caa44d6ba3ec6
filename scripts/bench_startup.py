"""Startup time of the ``autosdpa`` command: ``--help``, a command's ``--help``, an argument error, ``doctor``.

Each case runs as a fresh process, exactly as the console script does (``from autosdpa.cli import main``),
``--runs`` times with a warm page cache and ``--runs`` times with a cold one: before each cold run the files of
the virtual environment and of the autosdpa source are evicted from the page cache with
``posix_fadvise(DONTNEED)`` (no root needed; pages other processes have mapped stay). One more run under
``python -X importtime`` says whether the case imported torch.

    python scripts/bench_startup.py --label after                        # this tree
    git archive BASE autosdpa | tar -x -C /tmp/base
    python scripts/bench_startup.py --label before --src /tmp/base       # another autosdpa tree, first on sys.path

Each label's results are merged into ``--out``.json (other labels kept) and ``--out``.md is rewritten from it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = "import sys; from autosdpa.cli import main; sys.argv[0] = 'autosdpa'; sys.exit(main())"
CASES = {
    "autosdpa --help": ["--help"],
    "autosdpa tune --help": ["tune", "--help"],
    "autosdpa show --help": ["show", "--help"],
    "argument error (tune --bogus)": ["tune", "--bogus"],
    "autosdpa doctor --device cpu": ["doctor", "--device", "cpu"],
}


def evict(dirs: list[Path]) -> None:
    """Drop the files under ``dirs`` from the page cache (clean pages not mapped by anyone)."""
    for d in dirs:
        for root, _dirs, files in os.walk(d):
            for f in files:
                try:
                    fd = os.open(os.path.join(root, f), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def child_env(src: Path | None, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSDPA_")}
    env.update(AUTOSDPA_DB=str(tmp / "startup.sqlite"), XDG_CACHE_HOME=str(tmp / "xdg"), OPENBLAS_NUM_THREADS="1",
               COLUMNS="120")
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_once(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    # cwd: the temp folder, as ``python -c`` puts the working directory first on sys.path (before --src)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, *args], env=env, cwd=env["XDG_CACHE_HOME"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, p.returncode


def imports_torch(args: list[str], env: dict[str, str]) -> bool:
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", CONSOLE_SCRIPT, *args], env=env,
                       cwd=env["XDG_CACHE_HOME"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in p.stderr.splitlines())


def stats(xs: list[float]) -> dict:
    return {"median_s": round(statistics.median(xs), 4), "min_s": round(min(xs), 4), "max_s": round(max(xs), 4),
            "runs_s": [round(x, 4) for x in xs]}


def measure(src: Path | None, runs: int) -> dict:
    evict_dirs = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"]),
                  src or ROOT / "autosdpa"]
    with tempfile.TemporaryDirectory() as t:
        env = child_env(src, Path(t))
        Path(env["XDG_CACHE_HOME"]).mkdir()
        out = {}
        for name, args in CASES.items():
            run_once(args, env)  # the first run creates the database (doctor) and warms the cache
            warm = [run_once(args, env) for _ in range(runs)]
            cold = []
            for _ in range(runs):
                evict(evict_dirs)
                cold.append(run_once(args, env))
            out[name] = {"args": args, "exit_status": warm[0][1], "imports_torch": imports_torch(args, env),
                         "warm": stats([s for s, _ in warm]), "cold": stats([s for s, _ in cold])}
            print(f"{name:34s} warm {out[name]['warm']['median_s']:.3f} s  cold {out[name]['cold']['median_s']:.3f} s"
                  f"  exit {out[name]['exit_status']}  torch imported: {out[name]['imports_torch']}", flush=True)
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_bytes": mem}


def versions() -> dict:
    v = {"python": platform.python_version()}
    for pkg in ("torch", "click", "rich", "sqlalchemy", "autosdpa"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


def markdown(doc: dict) -> str:
    labels = list(doc["labels"])
    v = doc["versions"]
    lines = ["# `autosdpa` startup time (CPU)", "",
             f"{doc['machine']['cpu']}, {doc['machine']['cpu_count']} cores, "
             f"{(doc['machine']['memory_bytes'] or 0) / 1e9:.0f} GB; python {v['python']}, torch {v.get('torch', '-')},",
             f"click {v.get('click', '-')}, rich {v.get('rich', '-')}. `python scripts/bench_startup.py`: each case a "
             "new process, run as the console script runs;",
             "median of the runs (min–max), with a warm page cache, and cold (the venv's and the source's files "
             "evicted before each run).", ""]
    for label in labels:
        r = doc["labels"][label]
        la = r["loadavg_start"], r["loadavg_end"]
        lines.append(f"- **{label}**: {r['date']}, {r['source']}, {r['runs']} runs per case; load average "
                     f"{la[0][0]:.2f} at start, {la[1][0]:.2f} at end.")
    lines += ["", "| case | " + " | ".join(f"{lb}: warm | {lb}: cold | {lb}: torch imported" for lb in labels) + " |",
              "|---|" + "---|---|---|" * len(labels)]

    def cell(c: dict) -> str:
        return f"{c['median_s']:.2f} s ({c['min_s']:.2f}–{c['max_s']:.2f})"
    for case in CASES:
        cells = []
        for label in labels:
            r = doc["labels"][label]["cases"].get(case)
            cells += [cell(r["warm"]), cell(r["cold"]), "yes" if r["imports_torch"] else "no"] if r else ["-"] * 3
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="this tree", help="name of this measurement (e.g. before, after)")
    ap.add_argument("--src", type=Path, default=None, help="an autosdpa source tree put first on sys.path")
    ap.add_argument("--note", default="", help="what the tree is, e.g. 'git archive 7742d60'")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "startup_cpu")
    a = ap.parse_args()
    load0 = os.getloadavg()
    cases = measure(a.src.resolve() if a.src else None, a.runs)
    jpath = a.out.with_suffix(".json")
    doc = json.loads(jpath.read_text()) if jpath.exists() else {"labels": {}}
    doc.update(machine=machine(), versions=versions())
    doc["labels"][a.label] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs": a.runs,
        "source": (f"autosdpa from {a.src}" if a.src else "autosdpa from this tree") + (f" ({a.note})" if a.note else ""),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cases": cases}
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(doc, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {jpath} and {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
