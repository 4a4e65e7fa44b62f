"""CPU per model call of the openai client, by HTTP transport, with many calls in flight.

N concurrent callers each make k chat-completion calls to the simulator (its own process,
latency L), through: the bare `openai.AsyncOpenAI` with its default httpx transport, the same
client with the SDK's aiohttp transport (`openai.DefaultAioHttpClient`), and swarm's
`LLM.chat` (which uses the latter, plus limiters, retries and cost). Prints this process's
CPU milliseconds per call for each.

    .venv/bin/python bench/llm_client.py --n 300 --k 5 --latency-ms 2000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx2
import openai
from procs import start_simulator

from swarm.llm import LLM
from swarm.settings import Endpoint
from swarm.tools import tool_schemas

TOOLS = tool_schemas(["list_files", "finish"])
MESSAGES = [{"role": "system", "content": "You are a sub-agent in a swarm. " * 20},
            {"role": "user", "content": "Your task (a1): agent 1\n\nbench"}]


async def measure(call: Callable[[int], Awaitable[Any]], n: int, k: int) -> float:
    """CPU ms per call with n callers making k calls each (after a short warm-up)."""
    async def caller(i: int) -> None:
        for _ in range(k):
            await call(i)

    async with anyio.create_task_group() as tg:
        for i in range(min(n, 10)):
            tg.start_soon(caller, 100_000 + i)
    cpu = time.process_time()
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(caller, i)
    return 1000 * (time.process_time() - cpu) / (n * k)


async def bare(base: str, n: int, k: int, transport: str) -> float:
    limits = httpx2.Limits(max_connections=n, max_keepalive_connections=n)
    http = (openai.DefaultAioHttpClient(limits=limits) if transport == "aiohttp"
            else openai.DefaultAsyncHttpx2Client(limits=limits))
    client = openai.AsyncOpenAI(base_url=base, api_key="sk-none", max_retries=0,
                                http_client=http)
    body = {"model": "swarm-sim", "messages": MESSAGES, "tools": TOOLS}

    async def call(i: int) -> None:
        await client.post("/chat/completions", cast_to=httpx2.Response, body=body,
                          options={"headers": {"X-Swarm-Run": "r-bench",
                                               "X-Swarm-Node": f"a{i}"}})
    try:
        return await measure(call, n, k)
    finally:
        await client.close()


async def swarm_llm(base: str, n: int, k: int) -> float:
    llm = LLM({"default": Endpoint(base_url=base, model="swarm-sim",
                                   max_concurrency=max(64, n), timeout_s=60)})

    async def call(i: int) -> None:
        await llm.chat("worker", MESSAGES, TOOLS, run="r-bench", node=f"a{i}")
    try:
        return await measure(call, n, k)
    finally:
        await llm.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--latency-ms", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    sim, port = start_simulator(args.latency_ms, tool_steps=1000)
    base = f"http://127.0.0.1:{port}/v1"
    runs: dict[str, Callable[[], Awaitable[float]]] = {
        "openai, httpx transport": lambda: bare(base, args.n, args.k, "httpx"),
        "openai, aiohttp transport": lambda: bare(base, args.n, args.k, "aiohttp"),
        "swarm LLM.chat (aiohttp)": lambda: swarm_llm(base, args.n, args.k),
    }
    try:
        print(f"{args.n} callers x {args.k} calls, simulator latency {args.latency_ms} ms")
        for _ in range(args.rounds):
            for name, run in runs.items():
                ms = anyio.run(run, backend_options={"use_uvloop": True})
                print(f"  {name:<28} {ms:5.2f} ms CPU per call", flush=True)
    finally:
        sim.terminate()
        sim.wait()


if __name__ == "__main__":
    main()
