"""The watcher's widgets. Each takes a whole batch (a snapshot, a list of events) and changes
only what differs, so a busy run costs one small update per poll, never a redraw per event."""

from __future__ import annotations

from collections import deque

from textual.widgets import Log, Static

from swarm.tui.format import counts_markup, header_markup
from swarm.tui.snapshot import Snapshot


class Bar(Static):
    """A Static that repaints only when its text changes, without a layout pass."""

    def __init__(self, text: str = "", **kwargs: str) -> None:
        super().__init__(text, **kwargs)  # type: ignore[arg-type]
        self.text = text

    def set_text(self, text: str) -> None:
        if text != self.text:
            self.text = text
            self.update(text, layout=False)


class HeaderBar(Bar):
    DEFAULT_CSS = "HeaderBar { height: 4; padding: 0 1; background: $boost; }"

    def show(self, snap: Snapshot | None, connection: str = "") -> None:
        if snap is None:
            self.set_text(connection or "loading…")
        else:
            self.set_text(header_markup(snap, connection))


class CountsBar(Bar):
    DEFAULT_CSS = "CountsBar { height: 1; padding: 0 1; }"

    def show(self, snap: Snapshot, filtered: str = "") -> None:
        self.set_text(counts_markup(snap) + (f"   [dim]showing {filtered}[/]" if filtered else ""))


class EventLog(Log):
    """The run's events as they come, a batch per poll. Paused, it holds new lines back
    (up to its size) and says how many wait."""

    DEFAULT_CSS = "EventLog { height: 9; border-top: solid $primary; }"

    def __init__(self, max_lines: int = 1000, **kwargs: object) -> None:
        super().__init__(max_lines=max_lines, **kwargs)  # type: ignore[arg-type]
        self.paused = False
        self.held: deque[str] = deque(maxlen=max_lines)
        self.held_total = 0
        self._title()

    def add(self, lines: list[str]) -> None:
        if not lines:
            return
        if self.paused:
            self.held.extend(lines)
            self.held_total += len(lines)
            self._title()
        else:
            self.write_lines(lines[-(self.max_lines or len(lines)):])

    def toggle_pause(self) -> bool:
        self.paused = not self.paused
        if not self.paused:
            if self.held_total > len(self.held):
                self.write_line(f"… {self.held_total - len(self.held)} events skipped while paused")
            self.write_lines(list(self.held))
            self.held.clear()
            self.held_total = 0
        self._title()
        return self.paused

    def _title(self) -> None:
        if self.paused:
            self.border_title = f"events — PAUSED ({self.held_total} new; p resumes)"
        else:
            self.border_title = "events (p pauses)"
