"""Helpers the benchmarks share: a free loopback port, waiting for a server to listen, and
the simulator in its own process (so its CPU is not counted as the orchestrator's).

Imported as `procs` by the scripts in this folder (run as `python bench/NAME.py`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from swarm.runtime import free_port

__all__ = ["free_port", "start_simulator", "wait_port"]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing answered on port {port}")


def start_simulator(latency_ms: int, tool_steps: int) -> tuple[subprocess.Popen[bytes], int]:
    """The simulator on a free port, answering after `latency_ms`; returns it and its port."""
    port = free_port()
    code = ("from swarm.simulator import SimConfig, run_simulator_forever; "
            f"run_simulator_forever(SimConfig(latency_ms={latency_ms}, tool_steps={tool_steps}),"
            f" '127.0.0.1', {port})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port
