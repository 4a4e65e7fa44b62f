"""Wall time and CPU of the file merge (swarm.merge.merge_workspaces) of N node workspaces
into one output repository (prints figures; not a test).

    .venv/bin/python bench/merge.py [--n 100,1000] [--conflict-every 50]

Each workspace holds two files of its own (notes/part-i.md, data/part-i.json) and, every
`--conflict-every` nodes, its own version of a shared SUMMARY.md: those merges conflict and go
through the union fallback (no merge agent here), as a run without sandboxes does.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import anyio

from swarm.merge import merge_workspaces


def make_workspaces(root: Path, n: int, conflict_every: int) -> list[tuple[str, Path]]:
    out = []
    for i in range(n):
        node = f"part-{i:04d}"
        ws = root / node
        (ws / "notes").mkdir(parents=True)
        (ws / "data").mkdir()
        (ws / "notes" / f"{node}.md").write_text(f"# {node}\n\nfindings of {node}\n" * 20)
        (ws / "data" / f"{node}.json").write_text(f'{{"node": "{node}", "i": {i}}}\n')
        if conflict_every and i % conflict_every == 0:
            (ws / "SUMMARY.md").write_text(f"summary as {node} sees it\n")
        out.append((node, ws))
    return out


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="100,1000")
    ap.add_argument("--conflict-every", type=int, default=50)
    args = ap.parse_args()
    print(f"{'N':>6} {'wall s':>8} {'git CPU s':>10} {'swarm CPU s':>12} {'merged':>7} "
          f"{'conflicts':>9} {'files':>6}")
    for n in (int(x) for x in args.n.split(",")):
        root = Path(tempfile.mkdtemp(prefix="swarm-bench-merge-"))
        try:
            wss = make_workspaces(root / "ws", n, args.conflict_every)
            c0, s0, t0 = children_cpu(), self_cpu(), time.perf_counter()
            report = anyio.run(lambda: merge_workspaces(root / "out", wss))  # noqa: B023
            wall = time.perf_counter() - t0
            git_cpu, own = children_cpu() - c0, self_cpu() - s0
            print(f"{n:>6} {wall:>8.2f} {git_cpu:>10.2f} {own:>12.2f} {len(report.merged):>7} "
                  f"{len(report.conflicts):>9} {report.files:>6}", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
