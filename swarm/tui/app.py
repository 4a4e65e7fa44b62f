"""`swarm watch`: a Textual app over one run. It reads only through `RunSource` (the store's
state and event stream) and changes the run only on an explicit key (cancel, retry).

A single worker polls: one snapshot (run, plan, node states) plus the events since the last
one, applied as one batch; the widgets diff against what they show. Redis going away shows
"reconnecting…" in the header and the worker retries with backoff.
"""

from __future__ import annotations

import time

import anyio
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Footer, Input

from swarm.errors import RedisUnavailable, SwarmError
from swarm.models import TERMINAL_RUN_STATUSES, Event
from swarm.tui.format import event_line
from swarm.tui.plan_view import PlanView
from swarm.tui.screens import ConfirmScreen, HelpScreen, NodeScreen
from swarm.tui.snapshot import Filter, Snapshot
from swarm.tui.source import RunSource
from swarm.tui.widgets import CountsBar, EventLog, HeaderBar

LOG_BATCH = 500  # at most this many new lines reach the log per poll
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0
# The store's client retries a lost connection for a while before it gives up; no answer
# for this long already means the header should say so.
STALE_S = 3.0
MAIN_VIEW_ACTIONS = frozenset({"filter", "clear_filter", "retry", "pause"})
CATCH_UP_READS = 8  # event reads in a row, without a snapshot, while far behind


def _lines(events: list[tuple[str, Event]]) -> list[str]:
    return [event_line(ev) for _, ev in events[-LOG_BATCH:]]


class WatchApp(App[None]):
    TITLE = "swarm watch"
    CSS = """
    #filter { display: none; height: 3; }
    #filter.shown { display: block; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("slash", "filter", "filter"),
        Binding("escape", "clear_filter", "clear filter", show=False),
        Binding("c", "cancel_run", "cancel run"),
        Binding("r", "retry", "retry dead node"),
        Binding("p", "pause", "pause log"),
        Binding("question_mark", "help", "help"),
    ]

    def __init__(self, source: RunSource, *, poll_s: float = 0.75, idle_poll_s: float = 2.0
                 ) -> None:
        super().__init__()
        self.source, self.poll_s, self.idle_poll_s = source, poll_s, idle_poll_s
        self.snapshot: Snapshot | None = None
        self.filter = Filter()
        self.connection = ""
        self.polls = 0
        self.last_ok = time.monotonic()

    def compose(self) -> ComposeResult:
        yield HeaderBar("connecting…", id="header")
        yield CountsBar("", id="counts")
        yield Input(placeholder="filter: status names (running, dead, planned…) and text; "
                    "enter keeps it, escape clears it", id="filter")
        yield PlanView(id="plan")
        yield EventLog(id="events")
        yield Footer()

    def on_mount(self) -> None:
        # Kept: a query would search whichever screen is on top (a node, the help).
        self.header = self.query_one(HeaderBar)
        self.counts = self.query_one(CountsBar)
        self.filter_box = self.query_one("#filter", Input)
        self.table = self.query_one(PlanView)
        self.events_log = self.query_one(EventLog)
        self.table.focus()
        self.poll()
        self.set_interval(1.0, self._watchdog)

    # ---- polling -----------------------------------------------------------------------

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        delay, behind = RETRY_FIRST_S, 0
        while True:
            try:
                # Events first: the snapshot read after them is at least as new.
                events, more = await self.source.new_events()
                if more and self.snapshot is not None and behind < CATCH_UP_READS:
                    behind += 1  # far behind the stream: read on before the next snapshot
                    self.events_log.add(_lines(events))
                    continue
                snap = await self.source.snapshot()
            except (RedisUnavailable, SwarmError) as exc:
                self.connection = ("reconnecting…" if isinstance(exc, RedisUnavailable)
                                   else f"error: {exc}")
                self.source.forget_plan()
                self.header.show(self.snapshot, self.connection)
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay, behind, self.connection = RETRY_FIRST_S, 0, ""
            self.last_ok = time.monotonic()
            self.apply(snap, _lines(events))
            self.polls += 1
            if not more:
                idle = snap.run.status in TERMINAL_RUN_STATUSES and not events
                await anyio.sleep(self.idle_poll_s if idle else self.poll_s)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys of the main view do nothing over another screen (a modal blocks them all)."""
        if len(self.screen_stack) > 1:
            if isinstance(self.screen, ModalScreen):
                return action in ("quit",)
            return action not in MAIN_VIEW_ACTIONS
        return True

    def _watchdog(self) -> None:
        quiet = time.monotonic() - self.last_ok
        if quiet > STALE_S + self.idle_poll_s and not self.connection:
            self.connection = f"reconnecting… (no answer for {quiet:.0f}s)"
            self.header.show(self.snapshot, self.connection)

    def apply(self, snap: Snapshot, lines: list[str]) -> None:
        """One batch: header, counts and table from the same snapshot, then the log."""
        self.snapshot = snap
        self.header.show(snap, self.connection)
        self._show_rows()
        self.events_log.add(lines)

    def _show_rows(self) -> None:
        snap = self.snapshot
        if snap is None:
            return
        rows = self.filter.apply(snap.rows)
        shown = f"{len(rows)} matching {self.filter.describe()}" if self.filter else ""
        self.counts.show(snap, shown)
        self.table.show(rows)

    # ---- filter ------------------------------------------------------------------------

    def action_filter(self) -> None:
        box = self.filter_box
        box.add_class("shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter = Filter.parse(event.value)
        self._show_rows()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self) -> None:
        box = self.filter_box
        if not box.value.strip():
            box.remove_class("shown")
        self.table.focus()

    def action_clear_filter(self) -> None:
        box = self.filter_box
        box.value = ""
        box.remove_class("shown")
        self.filter = Filter()
        self._show_rows()
        self.table.focus()

    # ---- nodes -------------------------------------------------------------------------

    @on(PlanView.Selected)
    def _open_node(self, event: PlanView.Selected) -> None:
        event.stop()
        self.push_screen(NodeScreen(self.source, event.node_id))

    def action_retry(self) -> None:
        node = self.table.current_id
        row = self.snapshot.row(node) if self.snapshot and node else None
        if row is None:
            self.notify("select a node first", severity="warning")
        elif row.status != "dead":
            self.notify(f"node {row.id} is {row.status}: only a dead-lettered node can be "
                        "retried", severity="warning")
        else:
            self._retry(row.id)

    @work(group="commands")
    async def _retry(self, node: str) -> None:
        try:
            self.notify(await self.source.retry(node))
        except SwarmError as exc:
            self.notify(str(exc), severity="error")

    # ---- run ---------------------------------------------------------------------------

    def action_cancel_run(self) -> None:
        snap = self.snapshot
        if snap is not None and snap.run.status in TERMINAL_RUN_STATUSES:
            self.notify(f"run {snap.run.id} is already {snap.run.status}", severity="warning")
            return
        question = (f"Cancel run {self.source.run_id}? No new nodes start, running steps end, "
                    "and what exists is merged.")
        self.push_screen(ConfirmScreen(question), self._cancel_answered)

    def _cancel_answered(self, yes: bool | None) -> None:
        if yes:
            self._cancel()
        else:
            self.notify("not cancelled")

    @work(group="commands")
    async def _cancel(self) -> None:
        try:
            self.notify(await self.source.cancel())
        except SwarmError as exc:
            self.notify(str(exc), severity="error")

    def action_pause(self) -> None:
        paused = self.events_log.toggle_pause()
        self.notify("event log paused" if paused else "event log resumed", timeout=1.5)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())
