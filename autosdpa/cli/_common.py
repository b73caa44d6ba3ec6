"""Shared pieces of the ``autosdpa`` commands: options, device and database handling, formatting.

Nothing here imports torch or the dispatcher at module level: ``autosdpa --help`` and argument errors must
stay fast (each command imports what it needs when it runs)."""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.measure import Measurement

from ..text import fmt_seconds

#: stdout (results) and stderr (progress, notes): with --json only JSON goes to stdout.
out = Console(soft_wrap=False)
err = Console(stderr=True)


# -- options shared by several commands: one definition, one help text each ------------------------------

SHAPE_HELP = ("One problem as comma-separated fields, e.g. b=8,hq=32,lq=4096,d=128,causal (a full problem key "
              "works too). Fields and defaults: `autosdpa help shapes`, or docs/cli.md.")


def shape_option(*, repeat: bool = True, required: bool = False):
    """``--shape SPEC``: the one help text of the shape language (the field table is `autosdpa help shapes`)."""
    return click.option("--shape", "shapes" if repeat else "spec", multiple=repeat, required=required,
                        metavar="SPEC", help=SHAPE_HELP + (" Repeatable." if repeat else ""))


def default_db_path() -> Path:
    """Where the user's database lives unless AUTOSDPA_DB or --db says otherwise (``store.default_db_path``,
    without importing the store and SQLAlchemy for a help text)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("autosdpa")) / "autosdpa.sqlite"


def db_option(what: str = "Database", dest: str = "db"):
    """``--db PATH|URL``, the same in every command: what it is, and where the default lives."""
    return click.option(
        "--db", dest, default=None, metavar="PATH|URL",
        show_default=f"$AUTOSDPA_DB if set, else {default_db_path()}",
        help=f"{what}: an SQLite file path or an SQLAlchemy URL (postgresql+psycopg://...).")


def device_option(what: str = "Device to run on"):
    """``--device``: the torch device a command runs on (not the stored-environment filter, that is --gpu)."""
    return click.option("--device", default=None, metavar="cpu|cuda|cuda:N",
                        show_default="cuda if available, else cpu", help=f"{what}.")


def budget_option(what: str = "Timing budget per problem, in seconds (checks and warm-up come on top)"):
    return click.option("--budget", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                        show_default="$AUTOSDPA_BUDGET if set, else 1.0", help=f"{what}.")


def json_option(what: str = "Machine-readable output on stdout"):
    return click.option("--json", "as_json", is_flag=True, help=f"{what}.")


def shapes_help() -> str:
    """The shape-spec fields, one line each (``autosdpa help shapes``), from ``workload.FIELDS``."""
    from ..workload import FIELDS

    width = max(map(len, FIELDS))
    lines = ["--shape SPEC: comma-separated field=value items and bare flags, e.g.",
             "  b=8,hq=32,hkv=8,lq=4096,d=128,dtype=bf16,causal,train",
             "A full problem key (fwd|bf16|B=8|..., as `autosdpa show --json` prints it) works too. Flags also take",
             "=1/0/true/false. Fields, in the problem key's order:", ""]
    lines += [f"  {name:<{width}}  {help_} (default: {default})" for name, (help_, default) in FIELDS.items()]
    lines += ["", "More, with the workload-file format: docs/cli.md."]
    return "\n".join(lines)


def workload_options(fn):
    """--shape/--file/--preset/--from plus --dtype/--train/--limit; passes ``workload`` (a dict) to ``fn``."""
    opts = [
        shape_option(),
        click.option("--file", "files", multiple=True, metavar="FILE.toml|FILE.json",
                     type=click.Path(dir_okay=False),
                     help="Workload file listing problems (TOML or JSON; see docs/cli.md). Repeatable."),
        click.option("--preset", "presets", multiple=True, metavar="NAME",
                     help="A shipped model preset (see `autosdpa presets`). Repeatable."),
        click.option("--from", "recordings", multiple=True, metavar="FILE.jsonl",
                     type=click.Path(dir_okay=False),
                     help="Problems recorded by running a program with AUTOSDPA_RECORD=FILE.jsonl. Repeatable."),
        click.option("--dtype", default=None, metavar="fp16|bf16|fp32|fp64", show_default="each problem's own",
                     help="Override every problem's dtype."),
        click.option("--train", is_flag=True, help="Time forward + backward for every problem."),
        click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", show_default="all",
                     help="Only the first N problems (after de-duplication and sharding)."),
    ]
    for o in reversed(opts):
        fn = o(fn)

    @functools.wraps(fn)
    def wrapper(*args, shapes, files, presets, recordings, dtype, train, limit, **kwargs):
        wl = dict(shapes=shapes, files=files, presets=presets, recordings=recordings, dtype=dtype, train=train,
                  limit=limit)
        return fn(*args, workload=wl, **kwargs)
    return wrapper


def default_dtype_for(device) -> str:
    return "bf16" if device is not None and getattr(device, "type", "cpu") == "cuda" else "fp32"


def gather(wl: dict, device=None, *, shard: tuple[int, int] | None = None, required: bool = True) -> list:
    """Every problem named by the workload options, overridden, de-duplicated (by bucketed key), sharded,
    limited. Bad input raises click.BadParameter naming the option."""
    from .. import workload as W
    from ..workload import WorkItem, WorkloadError

    ddt = default_dtype_for(device)
    items: list[WorkItem] = []
    if wl["dtype"]:
        try:
            W.normalize_dtype(wl["dtype"])
        except WorkloadError as e:
            raise click.BadParameter(str(e), param_hint="--dtype") from None
    for spec in wl["shapes"]:
        try:
            items.append(WorkItem(W.parse_shape(spec, default_dtype=ddt), "", "--shape"))
        except WorkloadError as e:
            raise click.BadParameter(f"{spec!r}: {e}", param_hint="--shape") from None
    for path in wl["files"]:
        if not os.path.exists(path):
            raise click.BadParameter(f"no such file: {path}", param_hint="--file")
        try:
            items.extend(W.load_file(path, default_dtype=ddt))
        except WorkloadError as e:
            raise click.BadParameter(str(e), param_hint="--file") from None
    for name in wl["presets"]:
        try:
            items.extend(W.load_preset(name, default_dtype=ddt))
        except WorkloadError as e:
            raise click.BadParameter(str(e), param_hint="--preset") from None
    for path in wl["recordings"]:
        if not os.path.exists(path):
            raise click.BadParameter(f"no such file: {path}", param_hint="--from")
        try:
            items.extend(W.load_recording(path))
        except WorkloadError as e:
            raise click.BadParameter(str(e), param_hint="--from") from None
    if required and not items:
        raise click.UsageError("no problems given: use --shape, --file, --preset or --from (see --help)")
    try:
        items = W.apply_overrides(items, dtype=wl["dtype"], train=wl["train"])
    except WorkloadError as e:
        raise click.BadParameter(str(e), param_hint="--dtype") from None
    items = W.dedupe_canonical(items)
    if shard is not None:
        items = W.shard(items, *shard)
    if wl["limit"]:
        items = items[: wl["limit"]]
    return items


def resolve_device(spec: str | None, param_hint: str = "--device"):
    """'cpu', 'cuda', 'cuda:1' (default: cuda if available, else cpu) -> torch.device, or BadParameter."""
    import torch

    if spec is None or not spec.strip():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = spec.strip().lower()
    if s.isdigit():
        s = f"cuda:{s}"
    try:
        dev = torch.device(s)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"unknown device {spec!r}; expected cpu, cuda or cuda:N",
                                 param_hint=param_hint) from None
    if dev.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"device {spec!r}: autosdpa tunes on cpu or cuda only", param_hint=param_hint)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"device {spec!r}: CUDA is not available on this machine "
                                     f"(torch {torch.__version__}); use --device cpu", param_hint=param_hint)
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise click.BadParameter(f"device {spec!r}: this machine has {n} CUDA device(s) (0..{n - 1})",
                                     param_hint=param_hint)
    return dev


# -- the dispatcher and the database ----------------------------------------------------------------------

def _dispatcher():
    from ..dispatch import dispatcher

    return dispatcher


def cli_settings():
    """The settings of this command: ``Settings.from_env()``, read once per command line (bad values warn once)."""
    from ..config import Settings

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return Settings.from_env()
    meta = ctx.find_root().meta
    if "autosdpa.settings" not in meta:
        meta["autosdpa.settings"] = Settings.from_env()
    return meta["autosdpa.settings"]


def settings_for(db: str | None = None):
    """This command's settings, with ``--db`` (when given) in place of ``AUTOSDPA_DB``."""
    settings = cli_settings()
    return dataclasses.replace(settings, db=db) if db else settings


def use_db(db: str | None, *, create: bool = True):
    """Point this process's dispatcher at ``db`` (default: ``AUTOSDPA_DB``, else the user cache file) and
    return its store; a database that cannot be used is an ``Error:`` with exit status 1, whichever way it
    was named. Never writes ``os.environ``. ``create=False`` (a command that only looks up): a database that
    does not exist yet is not created; the dispatcher reads an empty one in memory instead, and a note says so."""
    from ..store import EmptyDatabase, Store, StoreError

    settings = settings_for(db)
    try:  # open it once ourselves: the dispatcher would fall back to memory with a warning instead
        Store(settings.db, readonly=not create, timeout_s=settings.db_timeout_s).close()
    except EmptyDatabase as e:
        _note_empty(e)
        settings = dataclasses.replace(settings, db=":memory:")
    except StoreError as e:
        raise click.ClickException(f"cannot use the database ({_db_origin(db, settings)}): {e}") from None
    d = _dispatcher()
    d.configure(settings)
    return d.store()


def read_db(db: str | None, *, note: bool = True):
    """The database (as ``use_db`` names it) with its shared layers, for a command that only reads it (show,
    doctor): opened read-only, so nothing is created, migrated or written (no folder, file, -journal or -wal).
    One that does not exist yet reads as empty, with a ``note`` on stderr: an in-memory store whose
    ``stands_in_for`` names it (see ``db_name``). A database that cannot be used is an ``Error:``, exit 1."""
    from ..store import EmptyDatabase, Store, StoreError

    settings = settings_for(db)
    shared = list(settings.all_shared_dbs())
    try:
        return Store(settings.db, readonly=True, shared=shared, timeout_s=settings.db_timeout_s)
    except EmptyDatabase as e:
        if note:
            _note_empty(e)
        empty = Store(":memory:", shared=shared, timeout_s=settings.db_timeout_s)
        empty.stands_in_for = (e.database, "not created yet")
        return empty
    except StoreError as e:
        raise click.ClickException(f"cannot use the database ({_db_origin(db, settings)}): {e}") from None


def db_name(store) -> str:
    """What to call a store from ``read_db``: the database it stands for when that does not exist yet."""
    return store.stands_in_for[0] if store.stands_in_for else store.display_url


def _db_origin(db: str | None, settings) -> str:
    return "--db" if db else ("AUTOSDPA_DB" if settings.db else "the user cache")


def _note_empty(e) -> None:
    err.print(f"note: {e}; read as an empty database (nothing is created until autosdpa first saves a "
              "measurement)", markup=False)


def current_store():
    """The store the dispatcher uses now."""
    return _dispatcher().store()


def configure_dispatcher(settings) -> None:
    """Point this process's dispatcher at ``settings`` (a worker process: its parent's, passed explicitly, not
    through os.environ)."""
    _dispatcher().configure(settings)


GPU_HELP = ("Only environments whose device name contains NAME (case-insensitive, e.g. H100), of a device "
            "type (cuda, cpu), or with a fingerprint starting with NAME; cuda:N names this machine's GPU N.")


def gpu_filter_option(fn):
    """``--gpu NAME`` (a filter on stored environments), with ``--device`` kept as a deprecated alias."""
    @functools.wraps(fn)
    def wrapper(*args, gpu, device_alias, **kwargs):
        if device_alias is not None:
            err.print("[yellow]warning:[/] --device is deprecated here (it filters stored environments); "
                      "use --gpu", markup=True)
            gpu = gpu or device_alias
        return fn(*args, gpu=resolve_gpu_filter(gpu), **kwargs)
    wrapper = click.option("--device", "device_alias", default=None, hidden=True,
                           help="Deprecated alias of --gpu.")(wrapper)
    return click.option("--gpu", default=None, metavar="NAME", show_default="every environment",
                        help=GPU_HELP)(wrapper)


def resolve_gpu_filter(pattern: str | None) -> str | None:
    """``cuda:N`` / ``N`` -> the name of this machine's GPU N (other filters unchanged)."""
    if pattern is None or not re.fullmatch(r"\s*(cuda:)?\d+\s*", pattern):
        return pattern
    import torch

    idx = int(pattern.strip().split(":")[-1])
    if not torch.cuda.is_available() or idx >= torch.cuda.device_count():
        raise click.BadParameter(f"{pattern!r}: this machine has no CUDA device {idx}", param_hint="--gpu")
    return torch.cuda.get_device_name(idx)


def tune_config(budget: float | None):
    from ..tuner import TuneConfig

    cfg = TuneConfig.from_env()
    if budget is not None:
        cfg = dataclasses.replace(cfg, budget_s=budget)
    return cfg


def deterministic(on: bool):
    """Deterministic algorithms on while timing a ``det=1`` problem (the key reads the global switch)."""
    from ..api import deterministic_mode

    return deterministic_mode(on)


fmt_s = fmt_seconds  # one formatter for the library and the command line


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def short_key(key: str) -> str:
    """A compact problem key for tables: ``fwd bf16 B=8 H=32/8 L=4096/4096 D=128 causal`` (the key itself if
    it does not parse)."""
    from ..problem import FIELDS, Problem

    try:
        p = Problem.parse(key)
    except ValueError:
        return key
    word = {f.attr: f.format(getattr(p, f.attr)) for f in FIELDS}  # each field as the key writes it
    s = f"{word['train']} {p.dtype} B={p.batch} H={p.hq}/{p.hkv} L={p.lq}/{p.lk} D={p.d}"
    if p.dv != p.d:
        s += f" Dv={p.dv}"
    default = Problem()
    extra = [word["causal"]] if p.causal != default.causal else []
    extra += [word["mask"]] if p.mask != default.mask else []
    extra += ["dropout"] if p.dropout else []
    extra += [word["layout"]] if p.layout != default.layout else []
    extra += ["det"] if p.deterministic else []
    extra += [word["tokens"]] if p.tokens != default.tokens else []
    return " ".join([s, *extra])


def shorten(text: str, n: int = 70) -> str:
    """A progress bar's label cut to ``n`` characters. Never for a reason or an error: those are shown whole."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def print_note(text: str, style: str = "dim") -> None:
    """A line of text on stdout: folded at spaces on a terminal, one line into a pipe."""
    out.print(text, style=style, markup=False, highlight=False, soft_wrap=not out.is_terminal)


def print_table(table, console: Console | None = None) -> None:
    """Print a rich table. On a terminal long cells fold at spaces within the window; into a pipe or a file
    nothing is wrapped or cut (every column as wide as its longest cell), so that problem keys and reasons
    stay whole, one row per line, for grep and cut."""
    console = console or out
    if console.is_terminal:
        console.print(table)
        return
    for col in table.columns:
        col.max_width, col.no_wrap, col.overflow = None, True, "ignore"
    width = Measurement.get(console, console.options.update_width(1 << 16), table).maximum
    Console(file=console.file, width=max(width, 40), soft_wrap=False, highlight=False,
            color_system=None).print(table)


def print_json(obj) -> None:
    import json

    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()
