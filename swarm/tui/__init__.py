"""The terminal UI (`swarm watch`, and `swarm run` attached to an interactive terminal).

Textual is imported only when a UI actually starts, so other commands stay quick.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.settings import Settings
    from swarm.store import Store


def want_tui(no_tui: bool, *, as_json: bool = False) -> bool:
    """The UI only in an interactive terminal; plain progress lines otherwise."""
    return not no_tui and not as_json and sys.stdout.isatty() and sys.stdin.isatty()


async def show_run(store: Store, settings: Settings, run_id: str) -> None:
    """Run the UI on `run_id` until the user quits (the run is not touched by quitting)."""
    from swarm.tui.app import WatchApp
    from swarm.tui.source import RunSource

    await WatchApp(RunSource(store, settings, run_id)).run_async()


async def watch(settings: Settings, run_id: str) -> int:
    """`swarm watch RUN`: 0 when the user quits; NotFound (exit 2) for an unknown run."""
    from swarm.runtime import connect_store

    store = await connect_store(settings)
    try:
        await store.get_run(run_id)
        await show_run(store, settings, run_id)
    finally:
        await store.close()
    return 0


__all__ = ["show_run", "want_tui", "watch"]
