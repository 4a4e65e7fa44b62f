"""The plan as a table on Textual's line API: only the rows in view are drawn, each drawn
row is cached by its cells, and a poll that changes a row repaints that line alone.

(A DataTable invalidates every cached cell on any update, so a busy 1,000-node run redrew
the whole view several times a second.)
"""

from __future__ import annotations

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from swarm.tui.format import COLUMNS, STATUS_STYLE, row_cells
from swarm.tui.snapshot import NodeRow

STATUS_COLUMN = 2
_STYLES = {status: Style.parse(spec) for status, spec in STATUS_STYLE.items()}


def fit(text: str, width: int) -> str:
    """`text` in exactly `width` cells; cut with an ellipsis when it is longer."""
    if width <= 0:
        return ""
    if cell_len(text) > width:
        return set_cell_size(text, width - 1) + "…"
    return set_cell_size(text, width)


class PlanView(ScrollView, can_focus=True):
    """Rows keyed by node id. `show` repaints changed rows in place and rebuilds only when
    the set or order of shown nodes changes (a plan revision, a filter)."""

    BINDINGS = [
        Binding("up", "move(-1)", "up", show=False),
        Binding("down", "move(1)", "down", show=False),
        Binding("pageup", "page(-1)", "page up", show=False),
        Binding("pagedown", "page(1)", "page down", show=False),
        Binding("home", "move(-1000000)", "first", show=False),
        Binding("end", "move(1000000)", "last", show=False),
        Binding("enter", "select", "open node"),
    ]
    COMPONENT_CLASSES = {"plan-view--header", "plan-view--cursor"}
    DEFAULT_CSS = """
    PlanView { height: 1fr; overflow-x: hidden; }
    PlanView > .plan-view--header { text-style: bold; background: $panel; }
    PlanView > .plan-view--cursor { background: $accent 40%; }
    """

    class Selected(Message):
        def __init__(self, node_id: str) -> None:
            super().__init__()
            self.node_id = node_id

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._rows: list[NodeRow] = []
        self._cells: list[tuple[str, ...]] = []
        self._index: dict[str, int] = {}
        self._strips: dict[int, tuple[object, Strip]] = {}
        self.cursor = 0
        self.rebuilds = 0
        self.row_updates = 0

    # ---- data ----------------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def shown_ids(self) -> list[str]:
        return [r.id for r in self._rows]

    @property
    def current_id(self) -> str | None:
        return self._rows[self.cursor].id if 0 <= self.cursor < len(self._rows) else None

    def show(self, rows: list[NodeRow]) -> None:
        if len(rows) != len(self._rows) or any(
            a.id != b.id for a, b in zip(rows, self._rows, strict=True)
        ):
            self._rebuild(rows)
            return
        for i, row in enumerate(rows):
            if row == self._rows[i]:
                continue
            self._rows[i] = row
            cells = row_cells(row)
            if cells != self._cells[i]:
                self._cells[i] = cells
                self.row_updates += 1
                self.refresh_line(i + 1)  # line 0 is the column header

    def _rebuild(self, rows: list[NodeRow]) -> None:
        keep = self.current_id
        self.rebuilds += 1
        self._rows = list(rows)
        self._cells = [row_cells(r) for r in rows]
        self._index = {r.id: i for i, r in enumerate(rows)}
        self._strips.clear()
        self.virtual_size = Size(self.size.width, len(rows) + 1)
        fallback = min(self.cursor, max(len(rows) - 1, 0))
        self.cursor = self._index.get(keep, fallback) if keep else fallback
        self._follow_cursor()
        self.refresh()

    def select_id(self, node_id: str) -> bool:
        if node_id not in self._index:
            return False
        self._move_to(self._index[node_id])
        return True

    # ---- keys and mouse ------------------------------------------------------------------

    def action_move(self, delta: int) -> None:
        self._move_to(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self._move_to(self.cursor + direction * max(1, self.size.height - 2))

    def action_select(self) -> None:
        if (node := self.current_id) is not None:
            self.post_message(self.Selected(node))

    def on_click(self, event: events.Click) -> None:
        index = int(self.scroll_y) + event.y - 1
        if 0 <= index < len(self._rows):
            if index == self.cursor and event.chain > 1:
                self.action_select()
            self._move_to(index)

    def _move_to(self, index: int) -> None:
        index = max(0, min(index, len(self._rows) - 1))
        if index == self.cursor:
            return
        old, self.cursor = self.cursor, index
        self.refresh_line(old + 1)
        self.refresh_line(index + 1)
        self._follow_cursor()

    def _follow_cursor(self) -> None:
        top, body = int(self.scroll_y), max(1, self.size.height - 1)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + body:
            self.scroll_to(y=self.cursor - body + 1, animate=False)

    # ---- drawing -------------------------------------------------------------------------

    def on_resize(self) -> None:
        self.virtual_size = Size(self.size.width, len(self._rows) + 1)
        self._strips.clear()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if y == 0:
            labels = tuple(label for _, label, _ in COLUMNS)
            return self._draw(labels, self.get_component_rich_style("plan-view--header"),
                              None, width)
        index = int(self.scroll_y) + y - 1
        if index >= len(self._rows):
            return Strip.blank(width, self.rich_style)
        cells = self._cells[index]
        key = (cells, index == self.cursor, width)
        cached = self._strips.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        base = self.rich_style
        if index == self.cursor:
            base = base + self.get_component_rich_style("plan-view--cursor")
        strip = self._draw(cells, base, _STYLES.get(self._rows[index].status), width)
        self._strips[index] = (key, strip)
        return strip

    @staticmethod
    def _draw(cells: tuple[str, ...], base: Style, status: Style | None, width: int) -> Strip:
        segments, used = [], 0
        for i, ((_, _, col_width), text) in enumerate(zip(COLUMNS, cells, strict=True)):
            last = i == len(COLUMNS) - 1
            w = max(0, width - used) if last else col_width
            cell = fit(text, w - 1) + ("" if last else " ")
            style = base + status if (i == STATUS_COLUMN and status) else base
            segments.append(Segment(cell, style))
            used += w
        return Strip(segments).crop(0, width).extend_cell_length(width, base)
