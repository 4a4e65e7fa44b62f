"""The terminal UI (swarm/tui) driven with Textual's pilot against real runs: the session's
redis-server, the simulator over HTTP, local sandboxes. Plus its pure parts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from swarm.commands import status_report
from swarm.models import (
    NODE_STATUSES,
    Budget,
    NodeSpec,
    NodeState,
    NodeStatusChanged,
    Plan,
    RunRecord,
    RunSpec,
    StepRecord,
    ToolResult,
    Usage,
)
from swarm.runtime import run_in_process
from swarm.simulator import SimConfig
from swarm.tui import want_tui
from swarm.tui.app import WatchApp
from swarm.tui.detail import cut, detail_markup
from swarm.tui.format import budget_parts, counts_plain, event_line
from swarm.tui.screens import ConfirmScreen, HelpScreen, NodeScreen
from swarm.tui.snapshot import Filter, build_snapshot
from swarm.tui.source import NodeDetail, RunSource
from swarm.tui.widgets import CountsBar, HeaderBar
from tests.e2e.conftest import runtime_factory  # noqa: F401 - the fixture, shared

pytestmark = pytest.mark.anyio
FAIL_GOAL = "Check these:\n- alpha\n- beta [sim:fail]"


def plain(widget: Any) -> str:
    rendered = widget.render()
    return str(getattr(rendered, "plain", rendered))


async def wait_for(pilot: Any, cond: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the UI"
        await pilot.pause(0.05)


def watcher(rt: Any, run_id: str) -> WatchApp:
    return WatchApp(RunSource(rt.store, rt.settings, run_id), poll_s=0.1, idle_poll_s=0.2)


async def finished_run(rt: Any, goal: str, out: Path, **spec: Any) -> str:
    rec = await rt.store.create_run(RunSpec(goal=goal, simulate=True, sandbox="local",
                                            output_dir=str(out), **spec))
    await run_in_process(rt, rec.id, slots=16)
    return rec.id


def synced(app: WatchApp, status: str | None = None) -> bool:
    snap = app.snapshot
    return snap is not None and snap.total > 0 and (status is None or snap.run.status == status)


# ---- against real runs --------------------------------------------------------------------


async def test_counts_add_up_while_running_and_match_the_store(runtime_factory, tmp_path):  # noqa: F811
    async with runtime_factory() as (rt, _sim):
        rec = await rt.store.create_run(RunSpec(goal="Write a guide in 12 parts", simulate=True,
                                                sandbox="local", output_dir=str(tmp_path / "out")))
        app = watcher(rt, rec.id)
        async with app.run_test(size=(170, 50)) as pilot:
            seen: set[int] = set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: run_in_process(rt, rec.id, slots=4))
                while (await rt.store.get_run(rec.id)).status not in ("done", "failed"):
                    snap = app.snapshot
                    if snap is not None:
                        assert sum(snap.counts.values()) == snap.total
                        seen.add(snap.counts["done"])
                    await pilot.pause(0.05)
            await wait_for(pilot, lambda: synced(app, "done"))
            report = await status_report(rt.store, rec.id)
            assert app.snapshot is not None
            assert app.snapshot.counts == report.counts
            counts = plain(app.query_one(CountsBar))
            assert "total 13 = planned 0 + queued 0 + running 0 + done 13" in counts
            assert "dead-lettered 0" in counts
            assert app.table.row_count == 13
            header = plain(app.query_one(HeaderBar))
            assert "done" in header and "Write a guide in 12 parts" in header
            assert "steps" in header and "/∞" in header
            assert len(seen) > 1  # it followed the run, not only its end
            assert "merge -> done" in "\n".join(app.events_log.lines)


async def test_opening_a_node_shows_its_transcript(runtime_factory, tmp_path):  # noqa: F811
    async with runtime_factory() as (rt, _sim):
        run_id = await finished_run(rt, "Write a guide in 3 parts", tmp_path / "out")
        app = watcher(rt, run_id)
        async with app.run_test(size=(170, 50)) as pilot:
            await wait_for(pilot, lambda: synced(app))
            assert app.table.select_id("part-002")
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, NodeScreen)
                           and app.screen.detail is not None)
            text = plain(app.screen.query_one("#detail"))
            assert "part-002" in text and "transcript" in text
            assert "→ write_file" in text and "← write_file ok" in text
            assert "wc -c notes" in text and "[exit code 0]" in text  # tool call and output
            assert "→ finish" in text
            assert "notes/part-002-0.md" in text  # the workspace files
            assert "backend local" in text  # the sandbox
            await pilot.press("escape")
            assert not isinstance(app.screen, NodeScreen)


async def test_filter_by_status_and_text(runtime_factory, tmp_path):  # noqa: F811
    async with runtime_factory() as (rt, _sim):
        run_id = await finished_run(rt, "Write a guide in 3 parts", tmp_path / "out")
        app = watcher(rt, run_id)
        async with app.run_test(size=(170, 50)) as pilot:
            await wait_for(pilot, lambda: synced(app, "done"))
            assert app.table.row_count == 4
            await pilot.press("slash", *"merge", "enter")
            assert app.table.shown_ids == ["merge"]
            assert "showing 1 matching \"merge\"" in plain(app.query_one(CountsBar))
            await pilot.press("escape")
            assert app.table.row_count == 4
            await pilot.press("slash", *"running")  # a status: live, while typing
            assert app.table.shown_ids == []
            await pilot.press("escape", "slash", *"done part-00", "enter")
            assert app.table.shown_ids == ["part-001", "part-002", "part-003"]
            await pilot.press("escape")
            assert app.table.row_count == 4


async def test_cancel_asks_then_cancels(runtime_factory, tmp_path):  # noqa: F811
    async with runtime_factory(sim=SimConfig(latency_ms=150)) as (rt, _sim):
        rec = await rt.store.create_run(RunSpec(goal="Write a guide in 20 parts", simulate=True,
                                                sandbox="local", output_dir=str(tmp_path / "out"),
                                                max_agents=2))
        app = watcher(rt, rec.id)
        async with app.run_test(size=(170, 50)) as pilot, anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_in_process(rt, rec.id, slots=2))
            await wait_for(pilot, lambda: synced(app, "running"))
            await pilot.press("c")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            assert not isinstance(app.screen, ConfirmScreen)
            await pilot.pause(0.3)
            assert (await rt.store.get_run(rec.id)).status == "running"  # asked; "no" kept it
            await pilot.press("c")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await wait_for(pilot, lambda: synced(app, "cancelled"))
        final = await rt.store.get_run(rec.id)
        assert final.status == "cancelled" and final.error == "cancelled by user"


async def test_retry_of_a_dead_node_requeues_it(runtime_factory, tmp_path):  # noqa: F811
    async with runtime_factory() as (rt, _sim):
        run_id = await finished_run(rt, FAIL_GOAL, tmp_path / "out")
        nodes = await rt.store.get_nodes(run_id)
        bad = next(nid for nid, n in nodes.items() if n.status == "dead")
        app = watcher(rt, run_id)
        async with app.run_test(size=(170, 50)) as pilot:
            await wait_for(pilot, lambda: synced(app, "failed"))
            assert app.snapshot is not None and app.snapshot.counts["dead"] == 1
            assert app.table.current_id != bad and app.table.current_id is not None
            await pilot.press("r")  # the selected node is not dead: refused, nothing sent
            await pilot.pause(0.2)
            assert (await rt.store.get_run(run_id)).status == "failed"
            await pilot.press("slash", *"dead", "enter")  # find it; the cursor is on it
            assert app.table.shown_ids == [bad] and app.table.current_id == bad
            await pilot.press("r")
            await wait_for(pilot, lambda: synced(app, "running"))  # reopened for a leader
        await run_in_process(rt, run_id, slots=4)  # what `swarm resume` does
        again = await rt.store.get_node(run_id, bad)
    assert again.attempt == 4 and again.status == "dead"  # one more attempt ran (and died)


async def test_reconnects_when_redis_restarts(runtime_factory, redis_factory, tmp_path):  # noqa: F811
    server = redis_factory()
    async with runtime_factory(redis_url=server.url) as (rt, _sim):
        run_id = await finished_run(rt, "Write a guide in 3 parts", tmp_path / "out")
        app = watcher(rt, run_id)
        async with app.run_test(size=(170, 50)) as pilot:
            await wait_for(pilot, lambda: synced(app, "done"))
            server.stop()  # graceful: the AOF has everything
            await wait_for(pilot, lambda: "reconnecting" in plain(app.query_one(HeaderBar)))
            server.start()
            polls = app.polls
            await wait_for(pilot, lambda: app.polls > polls + 1)
            assert "reconnecting" not in plain(app.query_one(HeaderBar))
            assert app.snapshot is not None and app.snapshot.counts["done"] == 4


# ---- many nodes, a busy stream: updates in place --------------------------------------------


class FakeSource:
    """1,000 nodes; each poll moves `per_poll` of them one status on and brings 300 events."""

    def __init__(self, n: int = 1000, per_poll: int = 10) -> None:
        self.run_id, self.n, self.per_poll, self.tick = "r-big", n, per_poll, 0
        self.plan = Plan(nodes=[NodeSpec(id=f"n{i:04d}", title=f"part {i}") for i in range(n)])
        self.record = RunRecord(id="r-big", spec=RunSpec(goal="big"), status="running")
        self.states = {s.id: NodeState(id=s.id) for s in self.plan.nodes}

    async def snapshot(self):
        order = ["pending", "queued", "running", "done"]
        for i in range(self.per_poll):
            st = self.states[f"n{(self.tick * self.per_poll + i) % self.n:04d}"]
            st.status = order[min(order.index(st.status) + 1, 3)]  # type: ignore[assignment]
            st.steps += 1
        self.tick += 1
        return build_snapshot(self.record, self.plan, dict(self.states))

    async def new_events(self):
        ev = NodeStatusChanged(run="r-big", node="n0001", status="running", attempt=1)
        return [(f"{self.tick}-{i}", ev) for i in range(300)], False

    def forget_plan(self) -> None:
        pass


async def test_a_thousand_nodes_update_in_place() -> None:
    source = FakeSource()
    app = WatchApp(source, poll_s=0.05)  # type: ignore[arg-type]
    async with app.run_test(size=(170, 50)) as pilot:
        await wait_for(pilot, lambda: app.polls >= 10)
        assert app.table.row_count == 1000
        assert app.table.rebuilds == 1  # built once; after that only changed cells
        assert app.table.row_updates <= app.polls * source.per_poll
        await pilot.press("down", "down")  # keys still answer while it polls
        assert app.table.current_id == "n0002"
        await pilot.press("slash", *"running", "enter")
        assert app.table.row_count == app.snapshot.counts["running"]  # type: ignore[union-attr]
        await pilot.press("p")
        assert app.events_log.paused
        await wait_for(pilot, lambda: app.events_log.held_total > 0)
        await pilot.press("p")
        assert not app.events_log.paused and app.events_log.line_count <= 1000
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "q")


# ---- pure parts -----------------------------------------------------------------------------


def test_counts_cover_every_row_including_unplanned_and_stateless_nodes() -> None:
    plan = Plan(nodes=[NodeSpec(id="a"), NodeSpec(id="b", deps=["a"]), NodeSpec(id="c")])
    states = {"a": NodeState(id="a", status="done"), "x": NodeState(id="x", status="dead")}
    snap = build_snapshot(RunRecord(id="r", spec=RunSpec(goal="g")), plan, states)
    assert [r.id for r in snap.rows] == ["a", "c", "b", "x"]  # by depth; the orphan last
    assert [r.depth for r in snap.rows] == [0, 0, 1, -1]
    assert snap.counts == {**dict.fromkeys(NODE_STATUSES, 0), "done": 1, "pending": 2, "dead": 1}
    assert sum(snap.counts.values()) == snap.total == 4
    assert counts_plain(snap) == ("total 4 = planned 2 + queued 0 + running 0 + done 1 + "
                                  "failed 0 + retrying 0 + dead-lettered 1")


def test_filter_parses_statuses_and_words() -> None:
    f = Filter.parse("Dead planned status:running part-00")
    assert f.statuses == {"dead", "pending", "running"} and f.words == ("part-00",)
    assert not Filter.parse("  ") and Filter.parse("x")
    assert Filter.parse("dead-lettered").statuses == {"dead"}


def test_budgets_show_used_over_limit() -> None:
    rec = RunRecord(id="r", spec=RunSpec(goal="g", budget=Budget(max_tokens=50_000,
                                                                 max_cost_usd=2.0)),
                    usage=Usage(tokens_in=12_000, tokens_out=345, cost_usd=0.5, steps=7))
    parts = budget_parts(rec)
    assert parts[0] == "tokens 12.3k/50.0k" and parts[1] == "cost $0.5000/$2.00"
    assert parts[2].endswith("/∞") and parts[3] == "steps 7/∞"


def test_long_output_is_cut_and_says_so() -> None:
    assert cut("short") == "short"
    out = cut("x" * 5000, limit=100)
    assert out.startswith("x" * 100) and "4900 more chars" in out
    assert "more chars" in cut("\n".join(["line"] * 50), lines=3)


def test_detail_shows_errors_retries_and_broken_tool_arguments(tmp_path: Path) -> None:
    steps = [
        StepRecord(n=0, kind="assistant", message={"role": "assistant", "content": "hi",
                   "tool_calls": [{"id": "1", "function": {"name": "shell",
                                                           "arguments": "{not json"}}]}),
        StepRecord(n=0, kind="tools", results=[ToolResult(call_id="1", name="shell",
                                                          content="boom" * 500, ok=False)]),
        StepRecord(n=1, kind="compaction", summary="earlier work", upto=1),
    ]
    d = NodeDetail(run_id="r", node_id="n", spec=NodeSpec(id="n"),
                   state=NodeState(id="n", status="dead", attempt=3, error="exit 1 [x]\\"),
                   steps=steps, files=None, workspace=tmp_path, sandbox="docker",
                   history=[NodeStatusChanged(run="r", node="n", status="retrying", attempt=2,
                                              reason="it broke")])
    from textual.markup import to_content

    text = to_content(detail_markup(d)).plain
    assert "error: exit 1 [x]\\" in text and "it broke" in text and "attempt 3/3" in text
    assert "→ shell {not json" in text and "← shell failed" in text and "more chars" in text
    assert "compaction" in text and "not on this host" in text


def test_event_lines_are_one_line_each() -> None:
    ev = NodeStatusChanged(run="r", node="n1", status="dead", attempt=3, reason="gave up")
    assert event_line(ev).endswith("n1 -> dead-lettered (attempt 3)  gave up")


def test_no_tui_without_a_terminal() -> None:
    assert want_tui(no_tui=True) is False
    assert want_tui(no_tui=False) is False  # pytest captures stdout: not a TTY


async def test_events_are_read_in_capped_batches(store, settings) -> None:
    from swarm.models import LogLine

    rec = await store.create_run(RunSpec(goal="g"))
    for i in range(24):
        await store.emit(LogLine(run=rec.id, message=f"m{i}"))
    source = RunSource(store, settings, rec.id, event_batch=10, max_batches=2)
    first, more = await source.new_events()
    assert len(first) == 20 and more  # run_created + 19 lines; the rest wait
    second, more = await source.new_events()
    assert len(second) == 5 and not more
    assert (await source.new_events()) == ([], False)
