"""Chaos harness: a real redis-server, the simulator, and swarm processes to kill.

Used by tests/chaos/ (sized for the suite) and bench/chaos.py (bigger, prints figures).

Every swarm process is a real subprocess (`python -m swarm.cli resume|worker|coordinator`)
pointed at a redis-server the harness can SIGKILL and restart, and at a simulator running
in *this* process (SimulatorThread), so the simulator's call counts survive every restart of
swarm. Verification reads only what survives: Redis (states, steps, completions, events),
the simulator's /stats, and the files on disk.

"Equals an undisturbed run": the simulator's answers are a pure function of (seed, run id,
node, step, prompt), and run ids normally differ between runs. So every run here, chaotic
or not, gets the same run id (RUN_ID) in its own Redis and SWARM_HOME: both runs then have
the same content by design, and their merged synthesis and output trees must be equal byte
for byte (RESULT.md, which lists timings and usage, is left out of the comparison).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio

from swarm.models import Completion, RunSpec, StepRecord
from swarm.settings import Settings
from swarm.simulator import SimConfig, SimulatorThread
from swarm.store import Store
from tests.conftest import RedisServer, free_port

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "r-chaos"
COORDINATOR_PHASES = {"planning": "planner"}


def goal_for(parts: int) -> str:
    return f"Write a field guide in {parts} parts"


# ---- processes -------------------------------------------------------------------------


class Proc:
    """One swarm subprocess, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv = name, argv
        self.log = log
        with open(log, "ab") as out:
            out.write(f"\n==== {name}: {' '.join(argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=REPO)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap: nothing of the process runs after this returns."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def note(self, line: str) -> None:
        with open(self.log, "a") as out:
            out.write(f"==== harness: {self.name} {line}\n")

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@dataclass
class Kill:
    """One disturbance: what was hit, when, in which run phase, which agents it interrupted."""

    target: str
    pid: int
    phase: str
    at: float
    interrupted: set[str] = field(default_factory=set)  # node ids (and "planner")


# ---- the cluster -----------------------------------------------------------------------


class Cluster:
    """A redis-server, a simulator and the swarm processes of one run, under `root`."""

    def __init__(self, root: Path, *, seed: int = 7, appendfsync: str = "everysec",
                 lease_ttl_s: float = 6.0, heartbeat_s: float = 0.5, latency_ms: float = 5,
                 sandbox: str = "local", tool_steps: int = 2,
                 extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = root / "home"
        self.output = root / "out"
        self.appendfsync = appendfsync
        self.lease_ttl_s, self.heartbeat_s = lease_ttl_s, heartbeat_s
        self.sandbox = sandbox
        self.redis = RedisServer(root / "redis", port=free_port())
        self.sim = SimulatorThread(SimConfig(seed=seed, latency_ms=latency_ms,
                                             tool_steps=tool_steps))
        self.procs: list[Proc] = []
        self.extra_env = extra_env or {}
        self.settings = Settings(home=self.home, redis_url=self.redis.url,
                                 lease_ttl_s=lease_ttl_s, heartbeat_s=heartbeat_s,
                                 redis_outage_s=15)

    # -- lifecycle

    def __enter__(self) -> Cluster:
        self.start_redis()
        self.sim.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
        self.sim.stop()
        self.redis.kill()

    def start_redis(self) -> None:
        self.redis.start()
        self.redis.command("CONFIG", "SET", "appendfsync", self.appendfsync)

    def restart_redis(self) -> None:
        """SIGKILL redis-server and start it again on the same port and AOF."""
        self.redis.kill()
        self.start_redis()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
        base = self.sim.base_url
        env.update({
            "SWARM_HOME": str(self.home),
            "SWARM_REDIS_URL": self.redis.url,
            "SWARM_LEASE_TTL_S": str(self.lease_ttl_s),
            "SWARM_HEARTBEAT_S": str(self.heartbeat_s),
            "SWARM_SANDBOX": self.sandbox,
            "SWARM_REDIS_OUTAGE_S": "15",
            "PYTHONPATH": str(REPO),
            "PYTHONFAULTHANDLER": "1",  # a crash in native code leaves a traceback
        })
        for role in ("PLANNER", "WORKER", "MERGER"):
            env[f"SWARM_ENDPOINTS__{role}__BASE_URL"] = base
            env[f"SWARM_ENDPOINTS__{role}__MODEL"] = "swarm-sim"
            env[f"SWARM_ENDPOINTS__{role}__MAX_CONCURRENCY"] = "256"
            env[f"SWARM_ENDPOINTS__{role}__TIMEOUT_S"] = "30"
        env.update(self.extra_env)
        return env

    def spawn(self, name: str, *args: str) -> Proc:
        argv = [sys.executable, "-m", "swarm.cli", *args]
        proc = Proc(name, argv, self.env(), self.root / f"{name}.log")
        self.procs.append(proc)
        return proc

    def resume(self, slots: int = 64) -> Proc:
        return self.spawn("resume", "resume", RUN_ID, "--no-tui", "--slots", str(slots))

    def worker(self, name: str, slots: int = 32) -> Proc:
        return self.spawn(name, "worker", "--slots", str(slots), "--sandbox", self.sandbox)

    def coordinator(self) -> Proc:
        return self.spawn("coordinator", "coordinator")

    # -- the store, from the test process

    def query(self, fn: Callable[[Store], Awaitable[T]]) -> T:
        async def go() -> T:
            store = await Store.connect(self.redis.url, self.settings)
            try:
                return await fn(store)
            finally:
                await store.close()

        return anyio.run(go)

    def create_run(self, goal: str, *, max_agents: int = 64) -> None:
        spec = RunSpec(goal=goal, max_agents=max_agents, sandbox=self.sandbox,  # type: ignore[arg-type]
                       output_dir=str(self.output))

        async def create(store: Store) -> None:
            await store.create_run(spec, run_id=RUN_ID)

        self.query(create)

    def run_status(self) -> str:
        async def get(store: Store) -> str:
            return (await store.get_run(RUN_ID)).status

        return self.query(get)

    def leader(self) -> str | None:
        async def get(store: Store) -> str | None:
            return await store.lease_owner(f"run:{RUN_ID}:leader")

        return self.query(get)

    def interrupted_by(self, pid: int) -> set[str]:
        """Nodes a process (by pid) was running when it stopped: still `running` in Redis
        under a worker name that carries its pid (runtime.process_name)."""
        mark = f"-{pid}-"

        async def get(store: Store) -> set[str]:
            nodes = await store.get_nodes(RUN_ID)
            return {nid for nid, n in nodes.items()
                    if n.status == "running" and mark in (n.worker or "")}

        return self.query(get)

    def snapshot_kill(self, proc: Proc, phase: str, *, stop: bool = False) -> Kill:
        kill = Kill(target=proc.name, pid=proc.pid, phase=phase, at=time.monotonic())
        if not stop:
            proc.kill()
        kill.interrupted = self.interrupted_by(proc.pid)
        if phase == "planning" and proc.name in ("resume", "coordinator"):
            kill.interrupted.add("planner")
        return kill

    def wait_for(self, cond: Callable[[], bool], timeout: float, what: str,
                 poll: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n"
                                     + self.logs_tail())
            time.sleep(poll)

    def wait_finished(self, timeout: float) -> str:
        terminal = {"done", "failed", "cancelled", "budget_exhausted"}
        self.wait_for(lambda: self.run_status() in terminal, timeout, "the run to finish",
                      poll=0.5)
        return self.run_status()

    def logs_tail(self, chars: int = 1500) -> str:
        seen: set[Path] = set()
        out = []
        for proc in self.procs:
            if proc.log not in seen:
                seen.add(proc.log)
                out.append(f"--- {proc.log.name}\n{proc.tail(chars)}")
        return "\n".join(out)

    # -- what the run left

    def outcome(self) -> Outcome:
        return self.query(collect)


# ---- outcome and checks ----------------------------------------------------------------


@dataclass
class Outcome:
    status: str
    error: str | None
    synthesis: str
    statuses: dict[str, str]
    attempts: dict[str, int]
    workers: dict[str, str | None]
    completions: list[Completion]
    steps: dict[str, list[StepRecord]]  # raw step streams (no dedup)
    events: list[Any]
    llm_calls_recorded: int
    stats: dict[str, Any] = field(default_factory=dict)
    tree: dict[str, str] = field(default_factory=dict)


async def collect(store: Store) -> Outcome:
    rec = await store.get_run(RUN_ID)
    nodes = await store.get_nodes(RUN_ID)
    r = store._r  # the harness reads the raw streams on purpose
    done = [Completion.model_validate_json(f["c"])
            for _, f in await r.xrange(store.keys.done(RUN_ID))]
    steps = {nid: [StepRecord.model_validate_json(f["s"])
                   for _, f in await r.xrange(store.keys.steps(RUN_ID, nid))]
             for nid in nodes}
    events = [e for _, e in await store.read_events(RUN_ID, count=100_000)]
    return Outcome(status=rec.status, error=rec.error, synthesis=rec.result_summary or "",
                   statuses={n: s.status for n, s in nodes.items()},
                   attempts={n: s.attempt for n, s in nodes.items()},
                   workers={n: s.worker for n, s in nodes.items()},
                   completions=done, steps=steps, events=events,
                   llm_calls_recorded=rec.usage.llm_calls)


def output_tree(out: Path) -> dict[str, str]:
    """relative path -> sha256 of every file of the merged output but RESULT.md and .git."""
    tree = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if rel.parts[0] == ".git" or rel.as_posix() == "RESULT.md" or not path.is_file():
            continue
        tree[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def finish(cluster: Cluster) -> Outcome:
    out = cluster.outcome()
    out.stats = cluster.sim.stats()
    out.tree = output_tree(cluster.output)
    return out


def agent_of(key: str) -> tuple[str, str]:
    """Simulator key run/agent/step -> (agent, node it belongs to). A merge node's tree of
    one-turn merger calls is labelled `{node}:L{level}:{index}` (merge/text.py)."""
    _run, agent, _step = key.rsplit("/", 2)
    return agent, agent.split(":", 1)[0]


@dataclass
class Figures:
    kills: int
    interrupted: int  # (kill, node) pairs: an agent hit by a kill
    repeated_calls: int  # LLM calls made more than once for the same (agent, step)
    max_repeats_per_agent_per_kill: float
    redone_nodes: int
    lost_nodes: int
    total_calls: int
    phases: dict[str, int]

    def line(self) -> str:
        return (f"kills {self.kills} (phases {dict(self.phases)}), interrupted agents "
                f"{self.interrupted}, repeated LLM calls {self.repeated_calls} (max "
                f"{self.max_repeats_per_agent_per_kill:g} per interrupted agent per kill), "
                f"nodes redone after done {self.redone_nodes}, nodes lost {self.lost_nodes}, "
                f"LLM calls {self.total_calls}")


def check(out: Outcome, base: Outcome | None, kills: list[Kill], *, nodes: int,
          exact_once: bool = True) -> Figures:
    """Assert the chaos guarantees and return the figures. exact_once=False (Redis lost
    acknowledged writes: appendfsync everysec and a power loss) checks only that the run
    completes with the same result; lost work is then redone, and that is counted."""
    assert out.status == "done", f"run ended {out.status}: {out.error}"
    lost = [n for n, s in out.statuses.items() if s != "done"]
    assert len(out.statuses) == nodes and not lost, f"nodes not done: {lost[:10]}"

    # Nothing finished is redone: one `done` completion per node, and no node goes back to
    # queued/running after its first `done` event.
    done_counts = Counter(c.node for c in out.completions if c.status == "done")
    redone = sorted(n for n, c in done_counts.items() if c > 1)
    first_done: dict[str, int] = {}
    for i, e in enumerate(out.events):
        if getattr(e, "type", "") == "node_status":
            if e.status == "done":
                first_done.setdefault(e.node, i)
            elif e.status in ("queued", "running") and e.node in first_done:
                redone.append(e.node)
    if exact_once:
        assert not redone, f"nodes redone after they were recorded done: {sorted(set(redone))}"
        assert set(done_counts) == set(out.statuses)
        # A crash is not the node's fault: no attempt is spent on it (jobs are reclaimed and
        # continue under the same attempt).
        spent = {n: a for n, a in out.attempts.items() if a != 1}
        assert not spent, f"attempts spent by the chaos: {spent}"

    # No step was recorded twice (a zombie cannot append): (n, kind) unique per node.
    for nid, steps in out.steps.items():
        keys = [(s.n, s.kind) for s in steps]
        dup = [k for k, c in Counter(keys).items() if c > 1]
        assert not dup, f"node {nid} has steps recorded twice: {dup}"

    # At most one repeated LLM call per interrupted agent per kill.
    hits: Counter[str] = Counter()
    for k in kills:
        hits.update(k.interrupted)
    repeats: Counter[str] = Counter()
    for key, count in out.stats["by_step"].items():
        if count > 1:
            agent, _node = agent_of(key)
            repeats[agent] += count - 1
    worst = 0.0
    for agent, extra in repeats.items():
        node = agent_of(f"x/{agent}/0")[1]
        allowed = hits[node] if agent != "planner" else hits["planner"]
        if exact_once:
            assert extra <= allowed, (
                f"agent {agent} repeated {extra} LLM call(s) but was interrupted {allowed} times")
        worst = max(worst, extra / max(1, allowed))

    if base is not None:
        assert out.synthesis == base.synthesis, "merged synthesis differs from undisturbed run"
        assert out.tree == base.tree, _tree_diff(out.tree, base.tree)
    return Figures(kills=len(kills), interrupted=sum(hits.values()),
                   repeated_calls=sum(repeats.values()), max_repeats_per_agent_per_kill=worst,
                   redone_nodes=len(set(redone)), lost_nodes=len(lost),
                   total_calls=out.stats["total"], phases=dict(Counter(k.phase for k in kills)))


def _tree_diff(a: dict[str, str], b: dict[str, str]) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    return (f"output tree differs from undisturbed run: only in chaos {only_a[:5]}, only in "
            f"baseline {only_b[:5]}, changed {changed[:5]}")


# ---- scenarios -------------------------------------------------------------------------


def undisturbed(root: Path, parts: int, **cluster_kw: Any) -> Outcome:
    with Cluster(root, **cluster_kw) as c:
        c.create_run(goal_for(parts))
        proc = c.resume()
        rc = proc.wait(timeout=600)
        assert rc == 0, f"undisturbed run exited {rc}\n{c.logs_tail()}"
        return finish(c)


def phase_of(c: Cluster) -> str:
    try:
        return c.run_status()
    except Exception:  # a phase label for a report, never a reason to fail
        return "?"


def kill_points(rng: random.Random, kills: int, merging: int) -> list[float]:
    """Seeded random moments on a progress scale: x in [0, 1) = when that fraction of the
    nodes is done; x >= 1 = that many seconds into the merge stage, minus one."""
    running = sorted(rng.uniform(0.0, 0.98) for _ in range(kills - merging))
    return running + [1.0 + rng.uniform(0.2, 2.5) for _ in range(merging)]


def progress(c: Cluster) -> tuple[str, float]:
    """The run's phase and the fraction of its nodes done."""
    async def get(store: Store) -> tuple[str, float]:
        rec = await store.get_run(RUN_ID)
        nodes = await store.get_nodes(RUN_ID)
        done = sum(1 for n in nodes.values() if n.status == "done")
        return rec.status, done / max(1, len(nodes))

    return c.query(get)


def wait_for_point(c: Cluster, proc: Proc, point: float, rng: random.Random) -> str | None:
    """Sleep until the kill point; returns the phase then, or None if the process ended."""
    merging_since: float | None = None
    while proc.alive():
        phase, done = progress(c)
        if phase in ("done", "failed", "cancelled", "budget_exhausted"):
            return None
        if phase == "merging":
            merging_since = merging_since or time.monotonic()
            if point < 1.0 or time.monotonic() - merging_since >= point - 1.0:
                return phase  # (a point the run went past between two polls: now)
        elif point < 1.0 and phase == "running" and done >= point:
            time.sleep(rng.uniform(0.0, 0.3))  # land anywhere in a step, not on a poll tick
            return progress(c)[0]
        time.sleep(0.05)
    return None


def kill_coordinator(root: Path, parts: int, *, kills: int, seed: int, merging: int = 2,
                     workers: int = 1, timeout: float = 600,
                     **cluster_kw: Any) -> tuple[Outcome, list[Kill]]:
    """`swarm resume` (leader + worker pool in one process) SIGKILLed `kills` times at
    seeded random moments spread over the run (the first while it plans, `merging` of them
    in the merge stage), resumed each time; `workers` extra `swarm worker` processes live
    through it all."""
    rng = random.Random(seed)
    points = kill_points(rng, kills - 1, merging)
    done: list[Kill] = []
    with Cluster(root, **cluster_kw) as c:
        c.create_run(goal_for(parts))
        for i in range(workers):
            c.worker(f"worker-{i}")
        proc = c.resume()
        # The first kill: as soon as it leads, i.e. while it plans.
        c.wait_for(lambda: f"-{proc.pid}-" in (c.leader() or "") or not proc.alive(), 60,
                   "the resumed process to take the lead", poll=0.01)
        done.append(c.snapshot_kill(proc, phase_of(c)))
        proc = c.resume()
        for point in points:
            phase = wait_for_point(c, proc, point, rng)
            if phase is None:
                break
            done.append(c.snapshot_kill(proc, phase))
            proc = c.resume()
        rc = proc.wait(timeout=timeout)
        assert rc == 0, f"final resume exited {rc}\n{c.logs_tail()}"
        return finish(c), done


def kill_workers(root: Path, parts: int, *, kills: int, seed: int, workers: int = 3,
                 timeout: float = 600, **cluster_kw: Any) -> tuple[Outcome, list[Kill]]:
    """A `swarm coordinator` leads; at `kills` seeded random moments of the run's progress
    one of `workers` `swarm worker` processes, picked at random, is SIGKILLed and started
    again at once."""
    rng = random.Random(seed)
    points = kill_points(rng, kills, merging=0)
    done: list[Kill] = []
    with Cluster(root, **cluster_kw) as c:
        c.create_run(goal_for(parts))
        pool = [c.worker(f"worker-{i}") for i in range(workers)]
        coord = c.coordinator()
        for point in points:
            phase = wait_for_point(c, coord, point, rng)
            if phase is None:
                break
            i = rng.randrange(len(pool))
            done.append(c.snapshot_kill(pool[i], phase))
            pool[i] = c.worker(f"worker-{i}")
        c.wait_finished(timeout)
        out = finish(c)
        assert coord.alive(), f"the coordinator died\n{c.logs_tail()}"
        return out, done


def stop_worker(root: Path, parts: int, *, seed: int, timeout: float = 600,
                **cluster_kw: Any) -> tuple[Outcome, list[Kill], str]:
    """A worker is SIGSTOPped while it holds jobs, stays stopped until every one of them
    was reclaimed by the other worker (it is past its lease), then is SIGCONTed: it must not
    commit anything for them. Returns the zombie's log; it must live on as a worker."""
    rng = random.Random(seed)
    with Cluster(root, **cluster_kw) as c:
        c.create_run(goal_for(parts))
        victim = c.worker("worker-zombie", slots=32)
        c.worker("worker-live", slots=64)  # room to take over the zombie's jobs
        c.coordinator()
        # Jobs here last tens of milliseconds, so what the victim holds changes between a
        # look and the signal: stop it, count what it holds now, and if that is under 3
        # let it go on for a moment and try again (a pause of milliseconds is far inside
        # its lease, so a retry changes nothing the test checks).
        for _ in range(200):
            c.wait_for(lambda: len(c.interrupted_by(victim.pid)) >= 3, 60,
                       "the victim worker to hold jobs", poll=0.05)
            time.sleep(rng.uniform(0, 0.3))
            victim.signal(signal.SIGSTOP)
            kill = c.snapshot_kill(victim, phase_of(c), stop=True)
            if len(kill.interrupted) >= 3:
                break
            victim.signal(signal.SIGCONT)
        else:
            raise AssertionError("never caught the victim holding 3 jobs at the stop")
        c.wait_for(lambda: not c.interrupted_by(victim.pid), 120,
                   "the paused worker's jobs to be reclaimed", poll=0.2)
        victim.signal(signal.SIGCONT)
        c.wait_finished(timeout)
        out = finish(c)
        assert victim.alive(), "the resumed worker died"
        return out, [kill], victim.tail(20_000)


@dataclass
class Recorded:
    """What Redis holds as acknowledged: nodes done, steps per node, completions."""

    status: str
    done: set[str]
    steps: dict[str, int]
    completions: int


async def recorded(store: Store) -> Recorded:
    rec = await store.get_run(RUN_ID)
    nodes = await store.get_nodes(RUN_ID)
    r = store._r
    async with r.pipeline(transaction=False) as pipe:
        for nid in nodes:
            pipe.xlen(store.keys.steps(RUN_ID, nid))
        pipe.xlen(store.keys.done(RUN_ID))
        lengths = await pipe.execute()
    return Recorded(status=rec.status,
                    done={n for n, s in nodes.items() if s.status == "done"},
                    steps=dict(zip(nodes, lengths[:-1], strict=True)), completions=lengths[-1])


class AofWatch:
    """Samples the size of redis-server's growing AOF file, so a kill can be turned into a
    power loss: the file cut back to what it held `lose_s` seconds earlier. A SIGKILL of
    redis-server alone loses nothing (its writes are in the OS page cache); a power loss
    loses what was not fsynced yet: up to about a second with `appendfsync everysec`,
    nothing acknowledged with `always`."""

    def __init__(self, redis_dir: Path) -> None:
        self.dir = redis_dir / "appendonlydir"
        self.samples: list[tuple[float, Path, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def incr_file(self) -> Path | None:
        try:
            lines = (self.dir / "appendonly.aof.manifest").read_text().splitlines()
        except OSError:
            return None
        names = [ln.split()[1] for ln in lines if ln.split()[-1] == "i"]
        return self.dir / names[-1] if names else None

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            path = self.incr_file()
            if path is not None:
                with contextlib.suppress(OSError):
                    self.samples.append((time.monotonic(), path, path.stat().st_size))

    def __enter__(self) -> AofWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cut_back(self, lose_s: float) -> int:
        """Truncate the AOF to its size `lose_s` ago (call with redis-server dead);
        returns the bytes dropped."""
        path = self.incr_file()
        if path is None or lose_s <= 0:
            return 0
        when = time.monotonic() - lose_s
        sizes = [size for t, p, size in self.samples if p == path and t <= when]
        keep = sizes[-1] if sizes else 0
        now = path.stat().st_size
        if keep >= now:
            return 0
        with open(path, "r+b") as f:
            f.truncate(keep)
        return now - keep


def kill_redis(root: Path, parts: int, *, seed: int, restarts: int = 1, lose_s: float = 0.0,
               window: tuple[float, float] = (1.0, 3.0), timeout: float = 600,
               **cluster_kw: Any) -> tuple[Outcome, list[Kill], dict[str, int]]:
    """redis-server SIGKILLed mid-run and restarted on the same AOF, `restarts` times; with
    `lose_s`, the AOF is first cut back by that many seconds of writes (a power loss under
    appendfsync everysec). Right before each kill, the nodes recorded done, the steps and
    the completions are snapshotted, and compared with what Redis has after the restart.
    swarm processes that die of the outage are restarted, as a supervisor would."""
    rng = random.Random(seed)
    kills: list[Kill] = []
    lost = Counter[str]()
    with Cluster(root, **cluster_kw) as c, AofWatch(c.redis.dir) as aof:
        c.create_run(goal_for(parts))
        c.worker("worker-0")
        proc = c.resume()
        c.wait_for(lambda: c.run_status() == "running", 60, "the run to start")
        for _ in range(restarts):
            time.sleep(rng.uniform(*window))
            before = c.query(recorded)
            if before.status not in ("running", "merging"):
                break
            c.redis.kill()
            lost["aof bytes cut"] += aof.cut_back(lose_s)
            c.start_redis()
            kills.append(Kill(target="redis", pid=0, phase=before.status, at=time.monotonic(),
                              interrupted=set(before.steps) - before.done))
            after = c.query(recorded)
            lost["done nodes"] += len(before.done - after.done)
            lost["steps"] += sum(max(0, n - after.steps.get(nid, 0))
                                 for nid, n in before.steps.items())
            lost["completions"] += max(0, before.completions - after.completions)
        deadline = time.monotonic() + timeout
        while c.run_status() not in ("done", "failed", "cancelled", "budget_exhausted"):
            if time.monotonic() > deadline:
                raise AssertionError("run did not finish\n" + c.logs_tail())
            for p in list(c.procs):
                if not p.alive() and p.popen.returncode != 0 and p.name.startswith("worker"):
                    lost["processes restarted"] += 1
                    p.note(f"exited {p.popen.returncode}; restarting it")
                    c.procs.remove(p)
                    c.worker(p.name)
            if not proc.alive() and proc.popen.returncode != 0:
                lost["processes restarted"] += 1
                proc.note(f"exited {proc.popen.returncode}; restarting it")
                proc = c.resume()
            time.sleep(0.5)
        proc.wait(timeout=60)
        return finish(c), kills, dict(lost)


def docker_containers(home: Path, *, running_only: bool) -> int:
    """Containers of this SWARM_HOME (label swarm.home), running or all."""
    from swarm.sandbox.layout import Layout

    home_id = Layout(home, home / "workspaces").home_id
    argv = ["docker", "ps", "-q", "--filter", f"label=swarm.home={home_id}"]
    if not running_only:
        argv.insert(2, "-a")
    return len(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split())


def kill_with_containers(root: Path, parts: int, *, min_live: int = 50, slots: int = 80,
                         finish_latency_ms: float | None = None, timeout: float = 600,
                         **cluster_kw: Any) -> tuple[Outcome, list[Kill], dict[str, int]]:
    """Docker sandboxes. Everything is SIGKILLed twice while at least `min_live` containers
    run: after the first kill `swarm gc` must remove them all; after the second, `swarm
    resume` re-attaches (or recreates) what it needs and the run must end with none left.
    Slow model answers keep containers alive together: an agent holds its container from
    its first tool call through its next model calls, so with answers slower than the engine
    needs to start `min_live` containers they are all alive at once on any machine (a fixed
    short latency made the peak depend on the engine's speed and was missed on a slow one).
    `finish_latency_ms` speeds the simulator up for the rest of the run once the kills are
    done."""
    figures: dict[str, int] = {}
    kills: list[Kill] = []
    with Cluster(root, sandbox="docker", **cluster_kw) as c:
        def live() -> int:
            n = docker_containers(c.home, running_only=True)
            if n < min_live and phase_of(c) not in ("planning", "running"):
                raise AssertionError(f"the run reached {phase_of(c)!r} before {min_live} "
                                     f"containers were alive at once\n{c.logs_tail()}")
            return n

        def left() -> int:
            return docker_containers(c.home, running_only=False)

        c.create_run(goal_for(parts), max_agents=slots)
        for wave in (1, 2):
            proc = c.resume(slots=slots)
            c.wait_for(lambda: live() >= min_live, 240, f"{min_live} live containers",
                       poll=0.2)
            kills.append(c.snapshot_kill(proc, phase_of(c)))
            figures[f"live containers at kill {wave}"] = live()
            c.wait_for(lambda: c.leader() is None, 30, "the dead leader's lease to expire")
            if wave == 1:
                gc = c.spawn("gc", "gc")
                assert gc.wait(timeout=120) == 0, gc.tail()
                figures["left after swarm gc"] = left()
        if finish_latency_ms is not None:
            c.sim.config.latency_ms = finish_latency_ms  # the server reads it per request
        proc = c.resume(slots=slots)
        rc = proc.wait(timeout=timeout)
        assert rc == 0, f"resume exited {rc}\n{c.logs_tail()}"
        figures["left after resume"] = left()
        return finish(c), kills, figures
