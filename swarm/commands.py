"""Bodies of the run-facing CLI commands. cli.py parses flags and calls these; each returns an
exit code (DESIGN.md: 0 success, 1 the run failed, 2 bad input, 3 infrastructure)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from swarm.coordinator import LostLeadership, leader_lease
from swarm.errors import ModelError, NotFound, SandboxError, UserError
from swarm.models import (
    NODE_STATUSES,
    TERMINAL_RUN_STATUSES,
    RunRecord,
    RunSpec,
    StatusReport,
)
from swarm.runtime import (
    Runtime,
    connect_store,
    open_runtime,
    process_name,
    run_in_process,
)
from swarm.settings import Settings
from swarm.store import Store

COUNT_NAMES = {"pending": "planned"}  # DESIGN.md's status --json calls pending nodes "planned"


def say(line: str) -> None:
    print(line, flush=True)


async def status_report(store: Store, run_id: str) -> StatusReport:
    rec = await store.get_run(run_id)
    plan = await store.get_plan(run_id)
    statuses = await store.node_statuses(run_id)
    ids = [n.id for n in plan.nodes] if plan else list(statuses)
    counts = Counter(statuses[i] for i in ids if i in statuses)
    return StatusReport(run=rec.id, status=rec.status,
                        counts={s: counts.get(s, 0) for s in NODE_STATUSES},
                        usage=rec.usage, elapsed_s=round(rec.elapsed_s, 2))


def status_json(report: StatusReport) -> str:
    data = report.model_dump(mode="json")
    data["counts"] = {COUNT_NAMES.get(k, k): v for k, v in data["counts"].items()}
    return json.dumps(data)


def progress_line(r: StatusReport) -> str:
    c = r.counts
    return (f"[{r.elapsed_s:7.1f}s] {r.status:<9} planned {c['pending']} queued {c['queued']} "
            f"running {c['running']} done {c['done']} failed {c['failed'] + c['dead']} "
            f"retrying {c['retrying']} | tokens {r.usage.tokens_in + r.usage.tokens_out} "
            f"cost ${r.usage.cost_usd:.4f} llm calls {r.usage.llm_calls}")


async def _print_progress(store: Store, run_id: str, every_s: float) -> None:
    last = ""
    while True:
        line = progress_line(await status_report(store, run_id))
        if line[10:] != last[10:]:  # skip lines where only the clock moved
            say(line)
            last = line
        await anyio.sleep(every_s)


async def _show_progress(rt: Runtime, run_id: str, progress_s: float, tui: bool,
                         finished: anyio.Event) -> None:
    """The terminal UI until the user quits it; then, while the run goes on, progress lines."""
    if tui:
        from swarm.tui import show_run

        await show_run(rt.store, rt.settings, run_id)
        if finished.is_set():
            return
        say(f"UI closed; run {run_id} goes on in this process (Ctrl-C stops it, "
            f"`swarm resume {run_id}` continues it later)")
    async with anyio.create_task_group() as tg:
        tg.start_soon(_print_progress, rt.store, run_id, progress_s)
        await finished.wait()
        tg.cancel_scope.cancel()


def exit_code_for(rec: RunRecord) -> int:
    return 0 if rec.status == "done" else 1


def _finished_lines(rec: RunRecord, settings: Settings) -> None:
    out = rec.spec.output_dir or str(settings.home / "output" / rec.id)
    say(f"run {rec.id} {rec.status} in {rec.elapsed_s:.1f}s: {rec.usage.llm_calls} LLM calls, "
        f"{rec.usage.steps} steps, {rec.usage.tokens} tokens, ${rec.usage.cost_usd:.4f}")
    if rec.error:
        say(f"  reason: {rec.error}")
    if rec.status in TERMINAL_RUN_STATUSES and not rec.spec.parent_run:
        say(f"  result: {out}/RESULT.md")


def detach(settings: Settings, run_id: str) -> None:
    """Continue the run in a background process that outlives this command."""
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{run_id}.log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", "swarm.cli", "resume", run_id, "--no-tui"],
                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=os.environ.copy())


async def _record(settings: Settings, spec: RunSpec) -> str:
    store = await connect_store(settings)
    try:
        rec = await store.create_run(spec)
    finally:
        await store.close()
    say(rec.id)
    return rec.id


async def submit(settings: Settings, spec: RunSpec) -> int:
    """Record the run for whichever `swarm coordinator` adopts it next; start nothing."""
    await _record(settings, spec)
    return 0


async def run(settings: Settings, spec: RunSpec, *, detached: bool, slots: int,
              progress_s: float = 2.0, faults: str = "", as_json: bool = False,
              tui: bool = False) -> int:
    if detached:
        detach(settings, await _record(settings, spec))
        return 0
    async with open_runtime(settings, simulate=spec.simulate, sandbox=spec.sandbox,
                            faults=faults) as rt:
        rec = await rt.store.create_run(spec)
        say(rec.id)
        if rt.simulated:
            say("no model endpoint configured (or --simulate): using the built-in simulator; "
                "output is simulated")
        say(f"sandboxes: {rt.sandboxes.name}")
        return await _attach(rt, rec.id, slots, progress_s, as_json=as_json, tui=tui)


async def resume(settings: Settings, run_id: str, *, detached: bool, slots: int,
                 progress_s: float = 2.0, tui: bool = False) -> int:
    store = await connect_store(settings)
    try:
        rec = await store.get_run(run_id)
        if rec.status not in TERMINAL_RUN_STATUSES:
            await wait_for_dead_leader(store, run_id)
    finally:
        await store.close()
    if rec.status in TERMINAL_RUN_STATUSES:
        _finished_lines(rec, settings)
        return exit_code_for(rec)
    if detached:
        detach(settings, run_id)
        say(run_id)
        return 0
    async with open_runtime(settings, simulate=rec.spec.simulate, sandbox=rec.spec.sandbox) as rt:
        say(f"resuming {run_id} from its last checkpoints")
        await reap_orphans(rt)
        return await _attach(rt, run_id, slots, progress_s, tui=tui)


async def reap_orphans(rt: Runtime) -> None:
    """Remove sandbox containers left by processes that died: those of finished runs and
    the warm pools of dead processes. Every unfinished run counts as live here (its
    containers are re-attached by whoever runs its nodes next, or removed at its end)."""
    live = [r.id for r in await rt.store.list_runs(limit=100_000)
            if r.status not in TERMINAL_RUN_STATUSES]
    removed = await rt.sandboxes.gc(live)
    if removed:
        say(f"removed {removed} orphaned sandbox container(s)")


async def wait_for_dead_leader(store: Store, run_id: str, poll_s: float = 0.1) -> None:
    """Return once nobody leads the run. A leader that died leaves a lease that runs out
    within its TTL; a live leader renews its lease, which is how it is told apart (then
    UserError: the run is not resumable, it is running)."""
    name = leader_lease(run_id)
    holder = await store.lease_owner(name)
    if holder is None:
        return
    left = await store.lease_left_s(name)
    say(f"run {run_id} was led by {holder}; waiting up to {left:.1f}s for its lease to expire")
    began = time.monotonic()
    while True:
        await anyio.sleep(poll_s)
        now_holder = await store.lease_owner(name)
        if now_holder is None:
            return
        expected = left - (time.monotonic() - began)  # what is left if nobody renews it
        renewed = await store.lease_left_s(name) > expected + max(0.25, 2 * poll_s)
        if now_holder != holder or renewed:
            raise UserError(f"run {run_id} is being led by {now_holder} (it renews its lease): "
                            "it is running, not resumable")


INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


async def _on_signals(interrupt: anyio.Event, everything: anyio.CancelScope,
                      forced: anyio.Event, listening: anyio.CancelScope) -> None:
    """First Ctrl-C (or SIGTERM): stop gracefully. A second one: stop at once (the model
    calls in flight are lost and repeated on resume; nothing recorded is)."""
    import signal

    with listening, anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if not interrupt.is_set():
                say("stopping: agents finish the model call in flight and hand their jobs "
                    "back (Ctrl-C again to quit at once)")
                interrupt.set()
            else:
                forced.set()
                everything.cancel()
                return


async def _attach(rt: Runtime, run_id: str, slots: int, progress_s: float, *,
                  as_json: bool = False, tui: bool = False) -> int:
    finished, interrupt, forced = anyio.Event(), anyio.Event(), anyio.Event()
    listening = anyio.CancelScope()
    completed = False
    async with anyio.create_task_group() as tg:
        tg.start_soon(_show_progress, rt, run_id, progress_s, tui, finished)
        tg.start_soon(_on_signals, interrupt, tg.cancel_scope, forced, listening)
        try:
            completed = await run_in_process(rt, run_id, slots=slots, interrupt=interrupt)
        except* LostLeadership as group:  # another process leads it: say so, exit 2
            raise UserError(str(group.exceptions[0])) from None
        finally:
            listening.cancel()  # Ctrl-C in a UI left open on the finished run quits it
            finished.set()
            if not tui or not completed:  # the UI stays up on a finished run until quit
                tg.cancel_scope.cancel()
    if not completed:
        how = "at once" if forced.is_set() else "after handing its jobs back"
        say(f"run {run_id} stopped {how}; everything recorded is kept: "
            f"`swarm resume {run_id}` continues it")
        return INTERRUPTED
    rec = await rt.store.get_run(run_id)
    report = await status_report(rt.store, run_id)
    say(progress_line(report))
    _finished_lines(rec, rt.settings)
    if as_json:
        say(status_json(report))
    return exit_code_for(rec)


async def status(settings: Settings, run_id: str, *, as_json: bool) -> int:
    store = await connect_store(settings)
    try:
        report = await status_report(store, run_id)
    finally:
        await store.close()
    say(status_json(report) if as_json else progress_line(report))
    return 0


async def list_runs(settings: Settings, *, as_json: bool) -> int:
    store = await connect_store(settings)
    try:
        rows: list[dict[str, Any]] = []
        for rec in await store.list_runs():
            led = await store.lease_owner(leader_lease(rec.id))
            # A nested run is resumed with its parent (whose leader leads it), not alone.
            resumable = (rec.status not in TERMINAL_RUN_STATUSES and not led
                         and not rec.spec.parent_run)
            rows.append({"run": rec.id, "status": rec.status, "resumable": resumable,
                         "created_at": rec.created_at, "goal": rec.spec.goal[:80],
                         "parent": rec.spec.parent_run})
    finally:
        await store.close()
    if as_json:
        say(json.dumps(rows))
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        flag = "resumable" if r["resumable"] else ""
        say(f"{r['run']}  {when}  {r['status']:<16} {flag:<9}  {r['goal']}")
    return 0


async def result(settings: Settings, run_id: str, *, output: Path | None) -> int:
    store = await connect_store(settings)
    try:
        rec = await store.get_run(run_id)
    finally:
        await store.close()
    src = Path(rec.spec.output_dir or settings.home / "output" / rec.id)
    report = src / "RESULT.md"
    if not report.is_file():
        if rec.result_summary:
            say(rec.result_summary)
            return 0
        raise NotFound(f"run {run_id} has no result yet (status {rec.status})")
    if output is not None:
        await anyio.to_thread.run_sync(
            lambda: shutil.copytree(src, output, dirs_exist_ok=True, symlinks=True,
                                    ignore=shutil.ignore_patterns(".git")))
        say(f"copied {src} to {output}")
    else:
        say(report.read_text())
    return 0


async def logs(settings: Settings, run_id: str, node: str | None) -> int:
    store = await connect_store(settings)
    try:
        await store.get_run(run_id)
        after = "0-0"
        while True:
            batch = await store.read_events(run_id, after=after, count=1000)
            if not batch:
                break
            for entry_id, ev in batch:
                after = entry_id
                if node and getattr(ev, "node", None) != node:
                    continue
                stamp = time.strftime("%H:%M:%S", time.localtime(ev.at))
                fields = ev.model_dump(exclude={"run", "at", "type"}, exclude_none=True)
                say(f"{stamp} {ev.type:<12} " + " ".join(f"{k}={v}" for k, v in fields.items()))
    finally:
        await store.close()
    return 0


async def cancel(settings: Settings, run_id: str) -> int:
    store = await connect_store(settings)
    try:
        rec = await store.get_run(run_id)
        if rec.status in TERMINAL_RUN_STATUSES:
            say(f"run {run_id} already {rec.status}")
            return 0
        live = set(("planning", "running", "merging"))
        ok = await store.set_run_status(run_id, "cancelled", expect=live, error="cancelled by user")
        say(f"run {run_id} cancelled" if ok else f"run {run_id} changed state; try again")
    finally:
        await store.close()
    return 0


async def worker(settings: Settings, *, slots: int, simulate: bool, sandbox: str) -> int:
    async with open_runtime(settings, simulate=simulate, sandbox=sandbox) as rt:
        w = rt.worker(slots)
        say(f"worker {w.name}: {slots} slots, sandboxes {rt.sandboxes.name}")
        await reap_orphans(rt)
        await _serve_until_signal(w.serve)
        say(f"worker {w.name} stopped; every job it held was checkpointed and handed back")
    return 0


async def coordinator(settings: Settings, *, simulate: bool, poll_s: float = 2.0) -> int:
    """Lead every unfinished run that has no live leader, until SIGTERM or Ctrl-C. Then it
    lets go of every run it leads (each lease released at once, not left to expire), so the
    next coordinator, or `swarm resume`, takes over without waiting."""
    async with open_runtime(settings, simulate=simulate) as rt:
        leading: set[str] = set()

        async def lead(run_id: str) -> None:
            try:
                await rt.coordinator().lead(run_id)
            except* LostLeadership:
                pass
            except* (UserError, SandboxError, ModelError) as group:
                # One run's failure (a plan that never validated...) is recorded on that
                # run; it must not take down the leader of every other run.
                say(f"run {run_id}: {'; '.join(str(e) for e in group.exceptions)}")
            finally:
                leading.discard(run_id)

        async def adopt(stop: anyio.Event) -> None:
            async with anyio.create_task_group() as tg:
                say(f"coordinator {process_name('coordinator')} adopting runs")
                while not stop.is_set():
                    for rec in await rt.store.list_runs(limit=1000):
                        if rec.status in TERMINAL_RUN_STATUSES or rec.id in leading:
                            continue
                        if rec.spec.parent_run:  # a nested run is led by its parent's leader
                            continue
                        if await rt.store.lease_owner(leader_lease(rec.id)) is None:
                            leading.add(rec.id)
                            tg.start_soon(lead, rec.id)
                    with anyio.move_on_after(poll_s):
                        await stop.wait()
                tg.cancel_scope.cancel()  # each lead releases its lease as it unwinds
            say("coordinator stopped; the runs it led are free for another leader")

        await _serve_until_signal(adopt)
    return 0


async def _serve_until_signal(serve: Callable[[anyio.Event], Awaitable[None]]) -> None:
    import signal

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    stop.set()
                    return

        tg.start_soon(on_signal)
        await serve(stop)
        tg.cancel_scope.cancel()


async def gc(settings: Settings) -> int:
    store = await connect_store(settings)
    try:
        live = {rec.id for rec in await store.list_runs(limit=10_000)
                if rec.status not in TERMINAL_RUN_STATUSES
                and await store.lease_owner(leader_lease(rec.id))}
    finally:
        await store.close()
    from swarm.runtime import pick_sandboxes

    backend = await pick_sandboxes(settings, "auto")
    try:
        removed = await backend.gc(live)
    finally:
        await backend.aclose()
    say(f"removed {removed} sandbox container(s) no live run owns")
    store = await connect_store(settings)
    try:
        pruned = await store.prune_run_index()
    finally:
        await store.close()
    if pruned:
        say(f"dropped {pruned} expired run(s) from the run index")
    return 0


async def export(settings: Settings, run_id: str, path: Path, *, keep: bool) -> int:
    from swarm.archive import export_run

    store = await connect_store(settings)
    try:
        done = await export_run(store, settings, run_id, path, keep=keep)
    finally:
        await store.close()
    runs = ", ".join(done.runs)
    say(f"exported {runs} to {done.path}")
    if done.expires_in_s is not None:
        say(f"  removed from Redis in {done.expires_in_s / 3600:g} h "
            "(SWARM_FINISHED_RUN_TTL_S; `swarm import` brings it back)")
    return 0


async def import_(settings: Settings, path: Path) -> int:
    from swarm.archive import import_file

    store = await connect_store(settings)
    try:
        runs = await import_file(store, path)
    finally:
        await store.close()
    say(f"imported {', '.join(runs)} from {path}")
    return 0
