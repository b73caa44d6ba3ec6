"""Shareable tuning databases: info, export, import, merge and prune (the logic behind ``autosdpa db``).

A tuning file is a plain SQLite database with the same schema as the user's database. Everything read from
one is data from elsewhere: every environment and every row is validated before it is used or copied
(see ``validated_rows``), and bad ones are skipped and counted, never trusted.

Conflict rule (``prefer``), per (environment, problem key, backend):
  keep the measurement with more evidence (more timing samples); on equal samples keep the newer one
  (``measured_at``); on a full tie keep what is already there. Rows are per environment: a row is only ever
  compared with a row of the *same* environment (same fingerprint and equal fields); an incoming environment
  whose fingerprint exists in the target with different fields is rejected with all its rows.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import os
import re
import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote
from typing import Iterable, Iterator

import sqlalchemy as sa

from .store import (ENV_FIELDS, Measurement, Store, StoreError, _upsert_measurements, db_url, decision_table,
                    environment_problem, environment_table, key_problem, known_backends, measurement_table,
                    retrying)


class SharingError(StoreError):
    """A file or database cannot be used for sharing (missing, not SQLite, not autosdpa, newer schema...)."""


@dataclasses.dataclass
class Report:
    """What one command did. ``rejected`` counts rows skipped as bad data or conflicts (``reasons`` says why)."""
    added: int = 0
    replaced: int = 0
    kept: int = 0
    rejected: int = 0
    removed: int = 0
    environments_added: int = 0
    environments_removed: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected += n
        self.reasons[reason] += n

    def __iadd__(self, other: "Report") -> "Report":
        for f in ("added", "replaced", "kept", "rejected", "removed", "environments_added", "environments_removed"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.reasons.update(other.reasons)
        return self

    def line(self) -> str:
        s = f"added {self.added}, replaced {self.replaced}, kept {self.kept}, rejected {self.rejected}"
        if self.removed or self.environments_removed:
            s += f", removed {self.removed} (environments removed {self.environments_removed})"
        if self.environments_added:
            s += f"; environments added {self.environments_added}"
        return s

    def reason_lines(self) -> list[str]:
        return [f"  rejected {n}: {r}" for r, n in self.reasons.most_common()]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["reasons"] = dict(self.reasons)
        return d


# -- opening ----------------------------------------------------------------------------------------------------

def _is_url(target) -> bool:
    return "://" in str(target)


def open_source(target: str | os.PathLike) -> Store:
    """Open a file (read-only, validated, never written) or a database URL for reading."""
    if _is_url(target):
        return Store(str(target), readonly=True)
    p = Path(target).expanduser()
    if not p.exists():
        raise SharingError(f"{target}: no such file")
    if not p.is_file():
        raise SharingError(f"{target}: not a file")
    try:
        return Store(str(p), readonly=True)
    except SharingError:
        raise
    except StoreError as e:
        raise SharingError(str(e).replace(db_url(p), str(target))) from None


def _same_file(url: str, out: str | os.PathLike) -> bool:
    """Whether the SQLite database at ``url`` is the file ``out`` (through links and ``..`` too)."""
    if _is_url(out) or not url.startswith("sqlite:///"):
        return False
    u = sa.engine.make_url(url).database or ""
    u = u[len("file:"):].split("?")[0] if u.startswith("file:") else u
    try:
        return Path(out).expanduser().exists() and os.path.samefile(unquote(u), Path(out).expanduser())
    except OSError:
        return False


def _fresh_output(out: str | os.PathLike, force: bool) -> Path:
    p = Path(out).expanduser()
    if _is_url(out):
        raise SharingError("the output must be a file path (an exported file is a plain SQLite file)")
    if p.exists():
        if not force:
            raise SharingError(f"{out} exists; pass --force to overwrite it")
        if not p.is_file():
            raise SharingError(f"{out} is not a file")
    for suffix in ("", "-wal", "-shm", "-journal"):
        q = Path(str(p) + suffix)
        if q.exists():
            q.unlink()
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _finish_file(p: Path) -> None:
    """Leave a self-contained file: rollback journal (DELETE), no -wal/-shm, compact."""
    con = sqlite3.connect(str(p))
    try:
        con.execute("PRAGMA journal_mode=DELETE")
        con.execute("VACUUM")
    finally:
        con.close()


# -- reading with validation -------------------------------------------------------------------------------------

def parse_time(text: str, *, now: float | None = None) -> float:
    """``2025-01-31``, ``2025-01-31T12:00[:00]`` (local time unless it has an offset) or a relative age
    ``30d`` / ``12h`` / ``2w`` (that long ago) -> seconds since the epoch."""
    text = text.strip()
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    try:
        return _dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD[THH:MM[:SS]]) or an age like 30d, 12h, 2w") from None


def env_matches(env: dict, device: str | None) -> bool:
    """``device`` filter: case-insensitive substring of the device name ("H100"), a device type ("cuda",
    "cpu"), or a fingerprint."""
    if not device:
        return True
    d = device.lower()
    return (d in str(env.get("device_name", "")).lower() or d == str(env.get("device_type", "")).lower()
            or d == str(env.get("fingerprint", "")).lower())


def validated_rows(src: Store, report: Report, *, device: str | None = None, since: float | None = None,
                   include_failed: bool = True, allow_unknown_backends: bool = False
                   ) -> Iterator[tuple[dict, str, Measurement]]:
    """Rows of ``src`` that are sane data; every other row is counted in ``report`` with its reason."""
    known = known_backends()
    env_verdict: dict[str, str | None] = {}
    for env, key, m in src.iter_rows(since=since):
        fp = env["fingerprint"]
        key_fp = fp if isinstance(fp, str) else repr(fp)
        if key_fp not in env_verdict:
            env_verdict[key_fp] = environment_problem(env)
        if env_verdict[key_fp]:
            report.reject(env_verdict[key_fp])
            continue
        if not env_matches(env, device):
            continue
        bad = key_problem(key)
        if bad is None:
            try:
                m.validate()
            except (ValueError, TypeError) as e:
                bad = _reason_of(str(e))
        if bad is None and m.backend not in known and not allow_unknown_backends:
            bad = "unknown backend (pass --allow-unknown-backends to keep well-formed names)"
        if bad:
            report.reject(bad)
            continue
        if not include_failed and not m.ok:
            continue
        yield env, key, m


def _reason_of(message: str) -> str:
    """A countable reason from a validation message (the offending value dropped)."""
    message = re.sub(r"=('[^']*'|\S+)", "", message)
    return re.sub(r" '.*'$", "", message)


# -- the conflict rule and merging ----------------------------------------------------------------------------

def prefer(incoming: Measurement, existing: Measurement | tuple[int, float]) -> bool:
    """True when ``incoming`` should replace ``existing`` (same environment, key, backend): more samples wins,
    then the newer measurement; a full tie keeps the existing row."""
    es, et = (existing.samples, existing.measured_at) if isinstance(existing, Measurement) else existing
    if incoming.samples != es:
        return incoming.samples > es
    return incoming.measured_at > et


def merge_rows(target: Store, rows: Iterable[tuple[dict, str, Measurement]], report: Report | None = None,
               *, dry_run: bool = False, chunk: int = 500) -> Report:
    """Apply the conflict rule to put ``rows`` (already validated) into ``target``."""
    report = report if report is not None else Report()
    envs: dict[str, int | None] = {}  # fingerprint -> target environment id (None: rejected)
    existing: dict[int, dict[tuple[str, str], tuple[int, float]]] = {}
    pending: list[dict] = []

    def flush():
        if pending and not dry_run:
            batch = list(pending)

            def write():
                with target._write.begin() as c:
                    for i in range(0, len(batch), chunk):
                        _upsert_measurements(c, batch[i:i + chunk])
            try:
                retrying(write)
            except sa.exc.SQLAlchemyError as e:
                raise StoreError(f"{target.display_url}: {e}") from e
        pending.clear()

    for env, key, m in rows:
        fp = env["fingerprint"]
        if fp not in envs:
            envs[fp] = _target_environment(target, env, report, dry_run)
            if envs[fp] is not None and envs[fp] not in existing:
                existing[envs[fp]] = _existing(target, envs[fp])
        eid = envs[fp]
        if eid is None:
            report.reject("environment conflict: same fingerprint, different fields in the target")
            continue
        have = existing[eid].get((key, m.backend))
        if have is None:
            report.added += 1
        elif prefer(m, have):
            report.replaced += 1
        else:
            report.kept += 1
            continue
        existing[eid][(key, m.backend)] = (m.samples, m.measured_at)
        pending.append(dict(environment_id=eid, problem_key=key, **dataclasses.asdict(m)))
        if len(pending) >= 5000:
            flush()
    flush()
    return report


def _target_environment(target: Store, env: dict, report: Report, dry_run: bool) -> int | None:
    t = environment_table
    with target.engine.connect() as c:
        row = c.execute(sa.select(t).where(t.c.fingerprint == env["fingerprint"])).mappings().first()
    if row is not None:
        if any(row[f] != env[f] for f in ENV_FIELDS):
            return None
        return row["id"]
    report.environments_added += 1
    if dry_run:
        return -report.environments_added  # a placeholder id with no rows
    return target.environment_id(env["fingerprint"], {f: env[f] for f in ENV_FIELDS})


def _existing(target: Store, eid: int) -> dict[tuple[str, str], tuple[int, float]]:
    if eid < 0:
        return {}
    m = measurement_table
    with target.engine.connect() as c:
        return {(r.problem_key, r.backend): (r.samples or 0, r.measured_at or 0.0) for r in c.execute(
            sa.select(m.c.problem_key, m.c.backend, m.c.samples, m.c.measured_at).where(m.c.environment_id == eid))}


# -- the commands ------------------------------------------------------------------------------------------------

def info(target: str | os.PathLike) -> dict:
    """Summary of a file or database: schema version, environments with row counts, rows that would be
    rejected on import (with reasons). Never writes to it."""
    src = open_source(target)
    try:
        report = Report()
        valid = list(validated_rows(src, report, allow_unknown_backends=True))
        known = known_backends()
        per_env: dict[str, dict] = {}
        for env in src.environments():
            per_env[env["fingerprint"]] = {**{k: env[k] for k in ("fingerprint", *ENV_FIELDS)},
                                           "created_at": env["created_at"], "problems": 0, "ok": 0,
                                           "rejected": 0, "skipped": 0, "unknown_backends": 0}
        problems = collections.defaultdict(set)
        newest = None
        for env, key, m in valid:
            e = per_env.get(env["fingerprint"])
            if e is None:
                continue
            e[m.status] += 1
            e["unknown_backends"] += m.backend not in known
            problems[env["fingerprint"]].add(key)
            newest = m.measured_at if newest is None else max(newest, m.measured_at)
        for fp, keys in problems.items():
            per_env[fp]["problems"] = len(keys)
        counts = src.counts()
        out = {"database": str(target), "schema_version": src.version, "counts": counts,
               "valid_rows": len(valid), "newest_measurement": newest,
               "environments": list(per_env.values()), **report.as_dict()}
        if not _is_url(target):
            out["bytes"] = Path(target).expanduser().stat().st_size
        return out
    finally:
        src.close()


def export(source: str | os.PathLike | None, out: str | os.PathLike, *, device: str | None = None,
           since: float | None = None, include_failed: bool = True, force: bool = False) -> Report:
    """Write the validated rows of ``source`` (default: the user DB) matching the filters to a new SQLite file
    ``out`` (journal_mode=DELETE: one self-contained file, readable by any SQLite tool)."""
    src = open_source(source) if source is not None else Store(None)
    try:
        if _same_file(src.url, out):
            raise SharingError("the output file is the source database")
        path = _fresh_output(out, force)
        report = Report()
        dst = Store(str(path), wal=False)
        try:
            merge_rows(dst, validated_rows(src, report, device=device, since=since, include_failed=include_failed,
                                           allow_unknown_backends=True), report)
        finally:
            dst.close()
        _finish_file(path)
        return report
    finally:
        src.close()


def import_file(source: str | os.PathLike, target: str | None = None, *, allow_unknown_backends: bool = False,
                dry_run: bool = False) -> Report:
    """Merge the validated rows of a file into ``target`` (default: the user DB, ``AUTOSDPA_DB``), applying the
    conflict rule. An older-schema file is read as it is and its rows land in the current schema."""
    src = open_source(source)
    try:
        dst = Store(target)
        try:
            if dst.url == src.url:
                raise SharingError("cannot import a database into itself")
            report = Report()
            merge_rows(dst, validated_rows(src, report, allow_unknown_backends=allow_unknown_backends), report,
                       dry_run=dry_run)
            return report
        finally:
            dst.close()
    finally:
        src.close()


def merge_files(sources: list[str | os.PathLike], out: str | os.PathLike, *, force: bool = False,
                allow_unknown_backends: bool = False) -> tuple[Report, list[tuple[str, Report]]]:
    """Merge files into a new file ``out``, in order, with the conflict rule. (total, per-file reports)."""
    srcs = []
    try:
        for s in sources:  # open (and so validate) every input before writing anything
            srcs.append(open_source(s))
        if any(_same_file(s.url, out) for s in srcs):
            raise SharingError("the output file is one of the inputs")
        path = _fresh_output(out, force)
        total, each = Report(), []
        dst = Store(str(path), wal=False)
        try:
            for name, src in zip(sources, srcs):
                r = Report()
                merge_rows(dst, validated_rows(src, r, allow_unknown_backends=allow_unknown_backends), r)
                each.append((str(name), r))
                total += r
        finally:
            dst.close()
        _finish_file(path)
        return total, each
    finally:
        for s in srcs:
            s.close()


def prune(target: str | None = None, *, other_torch: bool = False, old_kernels: bool = False,
          failed: bool = False, older_than: float | None = None, decisions: bool = False,
          device: str | None = None, dry_run: bool = False) -> Report:
    """Drop stale data from ``target`` (default: the user DB): environments of other torch versions
    (``other_torch``) or older kernel versions (``old_kernels``), rows that did not measure ok (``failed``),
    rows measured before ``older_than``, all rank decisions (``decisions``). ``device`` limits it to matching
    environments. Environments left without rows go too. ``removed`` counts measurement rows; ``kept`` what
    remains."""
    import torch

    from .environment import KERNELS_VERSION

    store = Store(target)
    report = Report()
    e, m, d = environment_table, measurement_table, decision_table
    cur_torch = torch.__version__.split("+")[0]
    try:
        envs = [env for env in store.environments() if env_matches(env, device)]
        stale = {env["id"] for env in envs
                 if (other_torch and env["torch"] != cur_torch) or (old_kernels and env["kernels"] != KERNELS_VERSION)}
        scope = [env["id"] for env in envs]
        row_cond = []
        if failed:
            row_cond.append(m.c.status != "ok")
        if older_than is not None:
            row_cond.append(m.c.measured_at < older_than)

        def work():
            with store._write.connect() as c:
                trans = c.begin()
                n = 0
                if stale:
                    n += c.execute(sa.delete(m).where(m.c.environment_id.in_(stale))).rowcount
                if row_cond and scope:
                    n += c.execute(sa.delete(m).where(m.c.environment_id.in_(scope), sa.or_(*row_cond))).rowcount
                if decisions:
                    c.execute(sa.delete(d).where(d.c.environment_id.in_(scope or [-1])))
                has_rows = sa.exists().where(m.c.environment_id == e.c.id)
                gone = set(c.execute(sa.select(e.c.id).where(e.c.id.in_(scope or [-1]), ~has_rows)).scalars())
                if gone:
                    c.execute(sa.delete(d).where(d.c.environment_id.in_(gone)))
                    c.execute(sa.delete(e).where(e.c.id.in_(gone)))
                remaining = c.execute(sa.select(sa.func.count()).select_from(m)).scalar()
                if dry_run:  # the same work, rolled back: the counts are exact
                    trans.rollback()
                else:
                    trans.commit()
                return n, len(gone), remaining
        n, gone, remaining = retrying(work)
        report.removed, report.environments_removed, report.kept = n, gone, remaining
        return report
    except sa.exc.SQLAlchemyError as e_:
        raise StoreError(f"{store.display_url}: {e_}") from e_
    finally:
        store.close()
