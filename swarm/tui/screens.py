"""Screens over the main view: a node's detail, a yes/no question, the key help."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Static

from swarm.errors import RedisUnavailable, SwarmError
from swarm.tui.detail import detail_markup
from swarm.tui.format import escape

if TYPE_CHECKING:
    from swarm.tui.source import NodeDetail, RunSource

HELP = """\
[b]swarm watch[/] — a viewer: it changes the run only when you ask (c, r)

  [b]q[/]          quit (the run goes on)
  [b]/[/]          filter the plan: status names (running, dead, planned …) and text
  [b]escape[/]     clear the filter / close a screen
  [b]enter[/]      open the selected node: transcript, sandbox, files, errors, retries
  [b]r[/]          retry the selected dead-lettered node (one more attempt)
  [b]c[/]          cancel the run (asks first)
  [b]p[/]          pause / resume the event log
  [b]?[/]          this help

Counts come from one read of the store: planned + queued + running + done + failed
+ retrying + dead-lettered = total, so work that was dropped stays in sight.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: 90; height: auto; padding: 1 2; border: thick $primary;
                          background: $surface; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; only `y` says yes."""

    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 76; height: auto; padding: 1 2; border: thick $error;
                               background: $surface; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(escape(self.question), id="question")
            yield Static("[b]y[/] yes    [b]n[/] / escape: no", id="answers")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class NodeScreen(Screen[None]):
    """One node, re-read every second while it may still change."""

    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "back"),
        Binding("r", "retry", "retry (dead node)"),
        Binding("question_mark", "app.help", "help"),
    ]
    DEFAULT_CSS = "NodeScreen #detail { padding: 0 1; }"

    def __init__(self, source: RunSource, node_id: str, every_s: float = 1.0) -> None:
        super().__init__()
        self.source, self.node_id, self.every_s = source, node_id, every_s
        self.detail: NodeDetail | None = None
        self._seen: tuple[object, ...] | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(f"loading {escape(self.node_id)}…", id="detail")
        yield Footer()

    async def on_mount(self) -> None:
        await self.refresh_detail()
        self.set_interval(self.every_s, self.refresh_detail)

    async def refresh_detail(self) -> None:
        """Read the node's state (one small read); the transcript and files only when it
        moved on since the last look."""
        try:
            st = await self.source.node_state(self.node_id)
            seen = (st.status, st.attempt, st.steps, st.updated_at) if st else None
            if seen == self._seen and self.detail is not None:
                return
            detail = await self.source.detail(self.node_id)
        except RedisUnavailable:
            self.notify("reconnecting…", severity="warning", timeout=2)
            return
        self._seen, self.detail = seen, detail
        self.query_one("#detail", Static).update(detail_markup(detail))

    async def action_retry(self) -> None:
        try:
            self.notify(await self.source.retry(self.node_id))
        except SwarmError as exc:
            self.notify(str(exc), severity="error")
        await self.refresh_detail()
