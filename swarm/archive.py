"""`swarm export` and `swarm import`: a finished run, whole, in one file; and its retention.

The file is JSON Lines, gzip-compressed when its name ends in `.gz`. Each line is one record
with a `type`; every JSON value Redis held is written as JSON (not as an escaped string):

  header      {"format": "swarm-run", "version": 1, "runs": [ids], "exported_at": t}
  run         {"run", "fields": the run's record (spec, status, usage, result summary...)}
  plans       {"run", "current": plan, "revisions": [every plan, oldest first]}
  node        {"run", "node", "state": node state, "result": node result or null}
  steps       {"run", "node", "entries": [{"id", "s": step}]}   (checkpointed agent steps)
  events      {"run", "entries": [{"id", "e": event}]}
  completions {"run", "entries": [{"id", "c": completion}]}
  replanned   {"run", "marks": [...]}
  calls       {"run", "calls": {key: recorded model answer}}   (the merge stage's)
  report      {"run", "text": RESULT.md or null}

Nested runs (the child run of a `swarm` node) go into the same file as their parent.
Once exported, the runs expire from Redis after settings.finished_run_ttl_s (unless kept),
so Redis does not grow with every run ever made; `swarm import` brings one back.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
from pydantic import ValidationError

from swarm.errors import UserError
from swarm.models import TERMINAL_RUN_STATUSES, Plan
from swarm.settings import Settings
from swarm.store import RunDump, Store
from swarm.store.archive import Entry

FORMAT, VERSION = "swarm-run", 1
_STREAMS = {"events": "e", "completions": "c"}


@dataclass
class Exported:
    runs: list[str]
    path: Path
    expires_in_s: float | None


# ---- export ------------------------------------------------------------------------------


async def export_run(store: Store, settings: Settings, run_id: str, path: Path, *,
                     keep: bool = False) -> Exported:
    """Write the finished run (and its nested runs) to `path`; then let them expire."""
    rec = await store.get_run(run_id)
    if rec.status not in TERMINAL_RUN_STATUSES:
        raise UserError(f"run {run_id} is {rec.status}: only a finished run can be exported")
    dumps = [await store.dump_run(rid) for rid in await _with_children(store, run_id)]
    reports = {d.run: _report(settings, d) for d in dumps}
    await anyio.to_thread.run_sync(_write, path, dumps, reports)
    ttl = settings.finished_run_ttl_s
    if keep or ttl <= 0:
        return Exported([d.run for d in dumps], path, None)
    for d in dumps:
        await store.expire_run(d.run, ttl)
    return Exported([d.run for d in dumps], path, ttl)


async def _with_children(store: Store, run_id: str) -> list[str]:
    out, todo = [], [run_id]
    while todo:
        rid = todo.pop(0)
        out.append(rid)
        plan = await store.get_plan(rid)
        kinds = {n.id: n.kind for n in plan.nodes} if plan else {}
        for nid, node in (await store.get_nodes(rid)).items():
            child = (node.result.data or {}).get("run") if node.result else None
            if kinds.get(nid) == "swarm" and isinstance(child, str) and child not in out:
                todo.append(child)
    return out


def _report(settings: Settings, dump: RunDump) -> str | None:
    spec = json.loads(dump.fields.get("spec", "{}"))
    out = Path(spec.get("output_dir") or settings.home / "output" / dump.run)
    try:
        return (out / "RESULT.md").read_text()
    except OSError:
        return None


def records(dump: RunDump, report: str | None) -> Iterator[dict[str, Any]]:
    """The file's records for one run."""
    run = dump.run
    fields: dict[str, Any] = dict(dump.fields)
    if "spec" in fields:
        fields["spec"] = json.loads(fields["spec"])
    yield {"type": "run", "run": run, "fields": fields}
    yield {"type": "plans", "run": run, "current": _load(dump.plan),
           "revisions": [json.loads(p) for p in dump.plans]}
    for nid, raw in dump.nodes.items():
        yield {"type": "node", "run": run, "node": nid, "state": json.loads(raw),
               "result": _load(dump.results.get(nid))}
    for nid, entries in dump.steps.items():
        yield {"type": "steps", "run": run, "node": nid, "entries": _entries(entries)}
    yield {"type": "events", "run": run, "entries": _entries(dump.events)}
    yield {"type": "completions", "run": run, "entries": _entries(dump.done)}
    yield {"type": "replanned", "run": run, "marks": dump.replanned}
    yield {"type": "calls", "run": run,
           "calls": {k: json.loads(v) for k, v in dump.calls.items()}}
    yield {"type": "report", "run": run, "text": report}


def _load(raw: str | None) -> Any:
    return json.loads(raw) if raw is not None else None


def _entries(entries: list[Entry]) -> list[dict[str, Any]]:
    return [{"id": e.id, **{k: json.loads(v) for k, v in e.fields.items()}} for e in entries]


def _open(path: Path, mode: str, *, gz: bool | None = None) -> IO[str]:
    if path.name.endswith(".gz") if gz is None else gz:
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


def _write(path: Path, dumps: list[RunDump], reports: dict[str, str | None]) -> None:
    """Atomically: a crash mid-export never leaves a truncated file under the name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with _open(tmp, "w", gz=path.name.endswith(".gz")) as f:
            header = {"type": "header", "format": FORMAT, "version": VERSION,
                      "runs": [d.run for d in dumps], "exported_at": time.time()}
            f.write(json.dumps(header) + "\n")
            for d in dumps:
                for rec in records(d, reports[d.run]):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- import ------------------------------------------------------------------------------


def read_dumps(path: Path) -> list[RunDump]:
    """Parse an export file back into raw dumps (blocking: run it in a thread)."""
    try:
        with _open(path, "r") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, gzip.BadGzipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not lines or lines[0].get("type") != "header" or lines[0].get("format") != FORMAT:
        raise UserError(f"{path} is not a swarm export file")
    if lines[0].get("version") != VERSION:
        raise UserError(f"{path} has export format version {lines[0].get('version')}; "
                        f"this swarm reads version {VERSION}")
    dumps: dict[str, RunDump] = {}
    try:
        for rec in lines[1:]:
            _apply(dumps, rec)
    except (KeyError, TypeError, AttributeError, ValidationError) as e:
        raise UserError(f"{path}: malformed export record: {type(e).__name__}: {e}") from None
    missing = [r for r in lines[0].get("runs", []) if r not in dumps]
    if missing:
        raise UserError(f"{path} is incomplete: no record of run(s) {', '.join(missing)}")
    return list(dumps.values())


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _raw_entries(entries: list[dict[str, Any]]) -> list[Entry]:
    return [Entry(id=e["id"], fields={k: _dumps(v) for k, v in e.items() if k != "id"})
            for e in entries]


def _apply(dumps: dict[str, RunDump], rec: dict[str, Any]) -> None:
    kind, run = rec.get("type"), str(rec.get("run"))
    if kind == "run":
        fields = dict(rec["fields"])
        if isinstance(fields.get("spec"), dict):
            fields["spec"] = _dumps(fields["spec"])
        dumps[run] = RunDump(run=run, fields={k: str(v) for k, v in fields.items()})
        return
    d = dumps.get(run)
    if d is None:
        raise UserError(f"export file: a {kind} record before its run record ({run})")
    if kind == "plans":
        if rec["current"] is not None:
            Plan.model_validate(rec["current"])  # a plan this swarm cannot read fails here
        d.plan = _dumps(rec["current"]) if rec["current"] is not None else None
        d.plans = [_dumps(p) for p in rec["revisions"]]
    elif kind == "node":
        d.nodes[rec["node"]] = _dumps(rec["state"])
        if rec.get("result") is not None:
            d.results[rec["node"]] = _dumps(rec["result"])
    elif kind == "steps":
        d.steps[rec["node"]] = _raw_entries(rec["entries"])
    elif kind == "events":
        d.events = _raw_entries(rec["entries"])
    elif kind == "completions":
        d.done = _raw_entries(rec["entries"])
    elif kind == "replanned":
        d.replanned = list(rec["marks"])
    elif kind == "calls":
        d.calls = {k: _dumps(v) for k, v in rec["calls"].items()}
    # `report` and unknown record types carry nothing Redis needs.


async def import_file(store: Store, path: Path) -> list[str]:
    """Restore every run in the file; refuses (UserError) if one of them exists already."""
    dumps = await anyio.to_thread.run_sync(read_dumps, path)
    for d in dumps:
        if await store.run_exists(d.run):
            raise UserError(f"run {d.run} already exists in this Redis; nothing imported")
    for d in dumps:
        await store.restore_run(d)
    return [d.run for d in dumps]
