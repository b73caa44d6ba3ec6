"""What the commands print: help texts that agree with each other, tables that never cut or fold a key or a
reason when piped, no spread claimed for one sample, and speedups within noise marked as such."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from autosdpa.cli import main
from autosdpa.cli._common import SHAPE_HELP, short_key

from .conftest import run_cli


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _commands(group: click.Group = main, parent: click.Context | None = None):
    """(context, command) of every command, with the contexts click gives them (show_default inherited)."""
    ctx = parent or click.Context(main, info_name="autosdpa", **main.context_settings)
    for name, cmd in group.commands.items():
        sub = click.Context(cmd, info_name=name, parent=ctx)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, sub)
        else:
            yield sub, cmd


def test_help_texts_agree():
    """One --db (PATH|URL, where the default lives, AUTOSDPA_DB), one --shape help, a default shown for every
    option that takes one value."""
    from autosdpa.store import default_db_path

    seen_db = seen_shape = 0
    for ctx, cmd in _commands():
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.is_flag or p.hidden or p.name in ("help", "version"):
                continue
            where = f"{ctx.command_path} {p.opts[0]}"
            extra = p.get_help_extra(ctx)
            if p.opts[0] == "--shape":
                seen_shape += 1
                assert p.help.startswith(SHAPE_HELP) and len(p.help) < 250, where
            if p.opts[0] == "--db":
                seen_db += 1
                assert p.metavar == "PATH|URL", where
                assert f"$AUTOSDPA_DB if set, else {default_db_path()}" in extra["default"], where
            if not p.multiple:  # a repeatable input's default is none given
                assert "default" in extra or "required" in extra, f"{where} shows no default"
    assert seen_db >= 6 and seen_shape >= 3
    r = invoke("db", "prune", "--help")
    assert "Selections combine as a union" in " ".join(r.output.split())


def test_help_shapes_lists_every_field():
    from autosdpa.workload import FIELDS

    r = invoke("help", "shapes")
    assert r.exit_code == 0
    for name, (_help, default) in FIELDS.items():
        assert any(line.split()[:1] == [name] and f"(default: {default})" in line for line in r.output.splitlines())
    assert invoke("help").output == invoke("--help").output


def _save(db, key: str, rows) -> None:
    from autosdpa.environment import environment
    from autosdpa.store import Store

    fp, info = environment("cpu")
    s = Store(str(db))
    s.save(fp, info, key, rows)
    s.close()


def test_explain_says_one_sample_instead_of_a_zero_spread(tmp_path):
    from autosdpa import workload as W
    from autosdpa.records import Measurement

    spec = "b=1,hq=2,lq=32,d=16"
    db = tmp_path / "e.sqlite"
    _save(db, W.canonical(W.parse_shape(spec)).key,
          [Measurement("math", "ok", 2e-5, 0.0, 1), Measurement("flash", "ok", 1e-5, 2e-6, 9)])
    r = invoke("explain", "--db", str(db), "--device", "cpu", "--no-tune", "--shape", spec)
    assert r.exit_code == 0, r.output
    cells = {c[0].rstrip(" ★"): c for c in _rows(r.output)}
    assert cells["math"][2] == "20.0 µs (1 sample)"
    assert cells["flash"][2] == "10.0 µs ± 2.0 µs"


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.lstrip().startswith("│")]


@pytest.mark.parametrize("columns", ["50", "200"])
def test_show_into_a_pipe_never_folds_a_key_or_cuts_a_reason(tmp_path, columns):
    from autosdpa.records import Measurement

    key = "fwdbwd|bf16|B=8|Hq=32|Hkv=8|Lq=4096|Lk=4096|D=128|Dv=128|causal|mask=none|drop=0|gqa=1|layout=blhd|det=0"
    reason = ("needs ~40.2 GB, 21.3 GB free: not run (tuning uses at most 80% of the free memory); " * 3).strip()
    db = tmp_path / "s.sqlite"
    _save(db, key, [Measurement("flash", "ok", 1e-3, 1e-5, 10),
                    Measurement("math", "skipped", detail=reason)])
    r = run_cli(["show"], db, COLUMNS=columns)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(short_key(key) in line for line in lines), r.stdout
    assert any(reason in line for line in lines), r.stdout
    assert len(_rows(r.stdout)) == 2  # one line per row


def test_bench_marks_what_is_noise():
    from autosdpa.cli.bench import _noted, _paired_speedup
    from autosdpa.sweep_report import within_noise

    base = [1.0, 1.1, 0.9, 1.0, 1.2, 0.95, 1.05]
    same = [1.05, 1.0, 1.0, 0.92, 1.1, 1.0, 1.0]  # the same kernel timed twice: ratios straddle 1
    lo, hi = _paired_speedup(base, same)
    assert lo < 1 < hi and within_noise(lo, hi) and _noted(0.84, True) == "0.84x (within noise)"
    lo, hi = _paired_speedup(base, [b / 2 for b in base])
    assert lo == hi == 2.0 and not within_noise(lo, hi) and _noted(2.0, False) == "2.00x"


def test_speedup_plot_draws_the_spread(tmp_path):
    pytest.importorskip("matplotlib")
    from autosdpa.sweep_report import speedup_plot

    path = tmp_path / "p.png"
    series = [{"label": "autosdpa", "median": [1.0, 1.5], "lo": [0.8, 1.4], "hi": [1.25, 1.6]},
              {"label": "best single backend: flash", "median": [0.84, None], "lo": [0.6, None], "hi": [1.1, None]}]
    assert speedup_plot(path, ["decode", "prefill"], series, "t") is None
    assert path.stat().st_size > 5000


def test_a_usage_error_creates_no_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["bench", "--preset", "nope"])
    assert r.exit_code == 2 and "unknown preset" in r.output
    assert list(tmp_path.iterdir()) == []


def test_tune_says_a_reason_of_every_problem_once(tmp_path):
    """A reason every problem shares is one line below the table, not a line in every row; a reason of one
    problem stays in its row; backends that take no call of this form (NestedTensor ones) are not listed."""
    r = invoke("tune", "--db", str(tmp_path / "t.sqlite"), "--device", "cpu", "--budget", "0.02",
               "--shape", "hq=2,lq=16,d=16,dropout", "--shape", "hq=2,lq=32,d=16,dropout", "--shape",
               "hq=2,lq=16,d=16,dropout,train")
    assert r.exit_code == 0, r.output
    assert "njt_" not in r.output
    rows = "\n".join(line for line in r.output.splitlines() if line.startswith("│"))
    below = next(line for line in r.output.splitlines() if line.startswith("rejected for every problem above: "))
    assert "flash" in below and "flash: Both" not in rows  # dropout: CPU flash cannot, said once