"""swarm.merge: tree-reduce synthesis, the git file merge, RESULT.md.

The model is a small fake class written here (a plain deterministic `chat`), not a mock of
openai: the real HTTP path is covered by the llm and e2e tests. git is the real binary.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import ModelError, SandboxError, UserError
from swarm.merge import (
    ConflictRecord,
    FileMergeReport,
    NodeReportRow,
    TextMerger,
    branch_name,
    merge_workspaces,
    reduce_groups,
    reduce_levels,
    render_report,
    tree_reduce,
)
from swarm.merge import files as files_module
from swarm.merge.conflicts import NoMergeTree
from swarm.models import Usage
from tests.conftest import require

# ---- reduce_groups / reduce_levels (pure) ------------------------------------------------


@given(n=st.integers(0, 3000), fan_in=st.integers(2, 64))
def test_reduce_groups_covers_every_index_once_in_bounded_groups(n: int, fan_in: int) -> None:
    groups = reduce_groups(n, fan_in)
    assert [i for g in groups for i in g] == list(range(n))  # each once, contiguous, in order
    assert all(1 <= len(g) <= fan_in for g in groups)
    assert len(groups) == math.ceil(n / fan_in)
    if groups:
        assert max(map(len, groups)) - min(map(len, groups)) <= 1


@given(n=st.integers(1, 100_000), fan_in=st.integers(2, 100))
def test_reduce_levels_is_ceil_log(n: int, fan_in: int) -> None:
    levels = reduce_levels(n, fan_in)
    assert fan_in**levels >= n
    assert levels == 0 or fan_in ** (levels - 1) < n


@pytest.mark.parametrize("fan_in", [1, 0, -3])
def test_fan_in_below_two_is_refused(fan_in: int) -> None:
    with pytest.raises(UserError):
        reduce_groups(10, fan_in)


# ---- tree_reduce ---------------------------------------------------------------------------


def _ceil_sum(n: int, fan_in: int) -> int:
    calls = 0
    while n > 1:
        n = math.ceil(n / fan_in)
        calls += n
    return calls


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.delay = delay

    async def __call__(self, texts: list[str], level: int, index: int) -> str:
        self.calls.append((level, index, len(texts)))
        # Later groups finish first: the output order must not depend on finishing order.
        await anyio.sleep(self.delay / (index + 1))
        return "(" + " ".join(texts) + ")"


def _leaves(text: str) -> list[str]:
    return text.replace("(", " ").replace(")", " ").split()


@pytest.mark.anyio
async def test_tree_reduce_thousand_items_fan_in_8() -> None:
    items = [f"i{k}" for k in range(1000)]
    rec = Recorder()
    out = await tree_reduce(items, 8, rec)
    assert len(rec.calls) == _ceil_sum(1000, 8) == 125 + 16 + 2 + 1
    assert max(size for *_, size in rec.calls) <= 8
    levels = {level for level, _, _ in rec.calls}
    assert len(levels) == math.ceil(math.log(1000, 8)) == reduce_levels(1000, 8) == 4
    assert _leaves(out) == items


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), fan_in=st.integers(2, 12))
def test_tree_reduce_property(n: int, fan_in: int) -> None:
    items = [f"i{k}" for k in range(n)]
    rec = Recorder()
    out = anyio.run(tree_reduce, items, fan_in, rec)
    assert _leaves(out) == items
    assert all(2 <= size <= fan_in for *_, size in rec.calls)  # a group of one costs no call
    assert len({level for level, _, _ in rec.calls}) == (reduce_levels(n, fan_in) if n > 1 else 0)
    expected, width = 0, n
    while width > 1:
        groups = reduce_groups(width, fan_in)
        expected += sum(len(g) > 1 for g in groups)
        width = len(groups)
    assert len(rec.calls) == expected


@pytest.mark.anyio
async def test_tree_reduce_trivial_inputs_make_no_call() -> None:
    rec = Recorder()
    assert await tree_reduce([], 8, rec) == ""
    assert await tree_reduce(["only"], 8, rec) == "only"
    assert rec.calls == []


@pytest.mark.anyio
async def test_tree_reduce_runs_a_level_concurrently_within_the_limiter() -> None:
    running = peak = 0

    async def combine(texts: list[str], level: int, index: int) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.005)
        running -= 1
        return "+".join(texts)

    items = [str(k) for k in range(40)]
    assert await tree_reduce(items, 2, combine, limiter=anyio.CapacityLimiter(3)) != ""
    assert peak == 3
    peak = 0
    await tree_reduce(items, 2, combine)
    assert peak == 20  # the whole first level at once


@pytest.mark.anyio
async def test_tree_reduce_keeps_order_whatever_finishes_first() -> None:
    items = [f"i{k}" for k in range(64)]
    out = await tree_reduce(items, 4, Recorder(delay=0.004))
    assert _leaves(out) == items


@pytest.mark.anyio
async def test_tree_reduce_raises_the_combine_error_itself() -> None:
    async def combine(texts: list[str], level: int, index: int) -> str:
        if index == 2:
            raise ModelError("no")
        await anyio.sleep(0.01)
        return "x"

    with pytest.raises(ModelError):
        await tree_reduce([str(k) for k in range(20)], 4, combine)


# ---- TextMerger against a small fake model ----------------------------------------------


@dataclass
class Reply:
    content: str | None
    usage: Usage


class FakeChat:
    """Deterministic stand-in for llm.LLM: answers with which call it was and what it saw."""

    def __init__(self, empty_for: str | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.empty_for = empty_for

    async def chat(
        self,
        role: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        run: str,
        node: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
    ) -> Reply:
        self.calls.append(
            {"role": role, "messages": messages, "tools": tools, "run": run, "node": node,
             "model": model}
        )
        inputs = sum(line.startswith("# ") for line in messages[-1]["content"].splitlines())
        content = None if node == self.empty_for else f"<{node} of {inputs}>"
        usage = Usage(tokens_in=100, tokens_out=10, llm_calls=1, cost_usd=0.1)
        return Reply(content, usage)


@pytest.mark.anyio
async def test_text_merger_tree_of_merger_calls() -> None:
    llm = FakeChat()
    merger = TextMerger(llm, fan_in=4, model="big")
    results = [(f"n{k}", f"finding {k}") for k in range(20)]
    text, usage = await merger.synthesize("run1", "write the report", results)
    # 20 -> 5 -> 2 -> 1
    nodes = sorted(c["node"] for c in llm.calls)
    assert nodes == sorted(
        [f"merge:L0:{i}" for i in range(5)] + ["merge:L1:0", "merge:L1:1", "merge:L2:0"]
    )
    assert all(c["role"] == "merger" and c["tools"] is None for c in llm.calls)
    assert all(c["run"] == "run1" and c["model"] == "big" for c in llm.calls)
    assert text == "<merge:L2:0 of 2>"
    assert usage.llm_calls == 8 and usage.tokens_out == 80
    assert usage.cost_usd == pytest.approx(0.8)
    first = next(c for c in llm.calls if c["node"] == "merge:L0:0")
    assert "write the report" in first["messages"][0]["content"]
    assert "node n0:" in first["messages"][-1]["content"]
    assert "finding 3" in first["messages"][-1]["content"]
    final = next(c for c in llm.calls if c["node"] == "merge:L2:0")
    assert "final merge" in final["messages"][0]["content"]
    assert "intermediate merge" in first["messages"][0]["content"]


@pytest.mark.anyio
async def test_text_merger_truncates_each_input_and_says_so() -> None:
    llm = FakeChat()
    merger = TextMerger(llm, fan_in=8, max_chars_per_input=500)
    results = [("big", "x" * 10_000), ("small", "tiny")]
    await merger.synthesize("r", "g", results)
    (call,) = llm.calls
    prompt = call["messages"][-1]["content"]
    assert "x" * 10_000 not in prompt
    assert "[truncated by swarm:" in prompt
    assert len(prompt) < 1000


@pytest.mark.anyio
async def test_text_merger_zero_or_one_result_needs_no_call() -> None:
    llm = FakeChat()
    merger = TextMerger(llm)
    assert await merger.synthesize("r", "g", []) == ("", Usage())
    assert await merger.synthesize("r", "g", [("a", "all of it")]) == ("all of it", Usage())
    assert llm.calls == []


@pytest.mark.anyio
async def test_text_merger_empty_answer_passes_inputs_up_labelled() -> None:
    merger = TextMerger(FakeChat(empty_for="merge:L0:0"))
    text, _ = await merger.synthesize("r", "g", [("a", "alpha"), ("b", "beta")])
    assert "returned no text" in text and "alpha" in text and "beta" in text


def test_text_merger_rejects_bad_limits() -> None:
    with pytest.raises(UserError):
        TextMerger(FakeChat(), fan_in=1)
    with pytest.raises(UserError):
        TextMerger(FakeChat(), max_chars_per_input=10)


# ---- merge_workspaces (real git) ---------------------------------------------------------


@pytest.fixture(autouse=False)
def git_ok() -> None:
    require(shutil.which("git") is not None, "git is not installed")


def git(repo: Path, *args: str) -> str:
    env = {"PATH": os.environ.get("PATH", os.defpath), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": os.devnull, "HOME": str(repo)}
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env=env, check=True)
    return proc.stdout


def workspace(root: Path, name: str, files: dict[str, str]) -> Path:
    ws = root / "ws" / name
    ws.mkdir(parents=True)
    for rel, text in files.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(text)
    return ws


def no_markers(text: str) -> bool:
    return not any(line.startswith(("<<<<<<<", ">>>>>>>", "=======")) for line in
                   text.splitlines())


def assert_settled(repo: Path) -> None:
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert not (repo / ".git" / "MERGE_HEAD").exists()
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"


pytestmark_git = pytest.mark.usefixtures("git_ok")


@pytestmark_git
@pytest.mark.anyio
async def test_three_nodes_different_files(tmp_path: Path) -> None:
    wss = [(n, workspace(tmp_path, n, {f"{n}/{n}.txt": f"from {n}\n"})) for n in "abc"]
    out = tmp_path / "out"
    report = await merge_workspaces(out, wss)
    assert report.merged == ["a", "b", "c"] and report.conflicts == [] and report.files == 3
    for n in "abc":
        assert (out / n / f"{n}.txt").read_text() == f"from {n}\n"
    branches = git(out, "branch", "--list", "node/*", "--format=%(refname:short)").split()
    assert branches == ["node/a", "node/b", "node/c"]
    assert report.commit == git(out, "rev-parse", "HEAD").strip()
    assert len(git(out, "rev-list", "--merges", "HEAD").split()) == 3
    assert git(out, "log", "-1", "--format=%an <%ae> %cn <%ce>").strip() == (
        "swarm <swarm@localhost> swarm <swarm@localhost>"
    )
    assert_settled(out)


class EditingResolver:
    def __init__(self, ok: bool = True, text: str = "resolved by the merge agent\n") -> None:
        self.calls: list[tuple[str, list[str], str]] = []
        self.ok, self.text = ok, text

    async def resolve(self, repo: Path, node: str, files: list[str]) -> bool:
        seen = (repo / files[0]).read_text()
        self.calls.append((node, files, seen))
        for f in files:
            (repo / f).write_text(self.text)
        return self.ok


def two_editors(tmp_path: Path) -> list[tuple[str, Path]]:
    return [
        ("a", workspace(tmp_path, "a", {"shared.md": "line from a\n", "a.txt": "a\n"})),
        ("b", workspace(tmp_path, "b", {"shared.md": "line from b\n", "b.txt": "b\n"})),
    ]


@pytestmark_git
@pytest.mark.anyio
async def test_same_file_goes_to_the_resolver_and_its_resolution_is_committed(
    tmp_path: Path,
) -> None:
    resolver = EditingResolver()
    out = tmp_path / "out"
    report = await merge_workspaces(out, two_editors(tmp_path), resolver=resolver)
    ((node, files, seen),) = resolver.calls
    assert (node, files) == ("b", ["shared.md"])
    assert "<<<<<<<" in seen  # it was handed the real mid-merge file
    assert report.conflicts == [
        ConflictRecord(node="b", files=["shared.md"], resolved=True, how="resolver")
    ]
    assert report.merged == ["a", "b"]
    assert (out / "shared.md").read_text() == "resolved by the merge agent\n"
    assert git(out, "show", "HEAD:shared.md") == "resolved by the merge agent\n"
    assert len(git(out, "rev-list", "--parents", "-n1", "HEAD").split()) == 3  # a merge commit
    assert_settled(out)


@pytestmark_git
@pytest.mark.anyio
async def test_without_resolver_union_fallback_leaves_no_markers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = await merge_workspaces(out, two_editors(tmp_path))
    (record,) = report.conflicts
    assert record.node == "b" and record.files == ["shared.md"]
    assert record.how == "union fallback" and not record.resolved
    text = (out / "shared.md").read_text()
    assert no_markers(text)
    lines = text.splitlines()
    assert lines[0] == "line from a" and lines[-1] == "line from b"
    assert "node b" in lines[1]
    assert (out / "a.txt").exists() and (out / "b.txt").exists()
    assert_settled(out)


@pytestmark_git
@pytest.mark.parametrize(
    ("resolver", "note"),
    [
        (EditingResolver(text="<<<<<<< HEAD\nstill\n>>>>>>> b\n"), "markers"),
        (EditingResolver(ok=False), "gave up"),
    ],
)
@pytest.mark.anyio
async def test_a_resolver_that_fails_falls_back_to_the_union(
    tmp_path: Path, resolver: EditingResolver, note: str
) -> None:
    out = tmp_path / "out"
    report = await merge_workspaces(out, two_editors(tmp_path), resolver=resolver)
    (record,) = report.conflicts
    assert record.how.startswith("union fallback") and note in record.how
    assert no_markers((out / "shared.md").read_text())
    assert_settled(out)


@pytestmark_git
@pytest.mark.anyio
async def test_a_resolver_planting_a_symlink_is_not_trusted(tmp_path: Path) -> None:
    class Linker:
        async def resolve(self, repo: Path, node: str, files: list[str]) -> bool:
            (repo / files[0]).unlink()
            (repo / files[0]).symlink_to("/etc/passwd")
            return True

    out = tmp_path / "out"
    report = await merge_workspaces(out, two_editors(tmp_path), resolver=Linker())
    assert "plain file" in report.conflicts[0].how
    assert not (out / "shared.md").is_symlink()
    assert_settled(out)


@pytestmark_git
@pytest.mark.anyio
async def test_a_raising_resolver_falls_back_to_the_union(tmp_path: Path) -> None:
    class Broken:
        async def resolve(self, repo: Path, node: str, files: list[str]) -> bool:
            raise SandboxError("container died")

    report = await merge_workspaces(tmp_path / "out", two_editors(tmp_path), resolver=Broken())
    assert "container died" in report.conflicts[0].how
    assert_settled(tmp_path / "out")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytestmark_git
@pytest.mark.anyio
async def test_unsafe_workspace_entries_are_not_copied(tmp_path: Path) -> None:
    box = tmp_path / "box"  # everything the test makes lives here, to compare before/after
    ws = workspace(box, "evil", {"ok.txt": "fine\n", "sub/inner.txt": "fine too\n"})
    outside = box / "secret.txt"
    outside.write_text("secret\n")
    (ws / "passwd").symlink_to("/etc/passwd")
    (ws / "up").symlink_to("..")
    (ws / "sub" / "escape").symlink_to("../../../secret.txt")
    (ws / "sub" / "dots").symlink_to("../../../../../..")
    os.link(outside, ws / "hardlink.txt")
    os.mkfifo(ws / "pipe")
    (ws / ".git").mkdir()
    (ws / ".git" / "config").write_text("[core]\n\tfsmonitor = touch /tmp/pwned\n")
    (ws / "sub" / ".GIT").write_text("gitdir: ../../..\n")
    before = _tree(box)
    out = box / "out"
    report = await merge_workspaces(out, [("evil", ws)])
    assert _tree(box) - before == {"out"} | {f"out/{p}" for p in _tree(out)}
    assert sorted(git(out, "ls-files").split()) == ["ok.txt", "sub/inner.txt"]
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert "secret" not in "".join(p.read_text() for p in out.rglob("*.txt"))
    skipped = " ".join(report.skipped)
    for what in ("passwd: link", "up: link", "sub/escape: link", "sub/dots: link",
                 "hardlink.txt: hard link", "pipe: link or special file"):
        assert f"evil: {what}" in skipped
    assert outside.read_text() == "secret\n"


@pytestmark_git
@pytest.mark.anyio
async def test_bad_node_ids_and_overlaps_are_refused(tmp_path: Path) -> None:
    ws = workspace(tmp_path, "a", {"f": "x"})
    with pytest.raises(UserError):
        await merge_workspaces(tmp_path / "out", [("../../escape", ws)])
    with pytest.raises(UserError):
        await merge_workspaces(tmp_path / "out", [("a", ws), ("a", ws)])
    with pytest.raises(UserError):
        await merge_workspaces(ws / "out", [("a", ws)])
    assert not (tmp_path / "out").exists() and not (ws / "out").exists()


@pytestmark_git
@pytest.mark.anyio
async def test_merge_is_idempotent_and_reproducible(tmp_path: Path) -> None:
    wss = [*two_editors(tmp_path), ("c", workspace(tmp_path, "c", {"c/deep/c.py": "print()\n"}))]
    (wss[2][1] / "c" / "deep" / "c.py").chmod(0o755)
    out = tmp_path / "out"
    first = await merge_workspaces(out, wss)
    (out / "RESULT.md").write_text("written after the merge\n")
    second = await merge_workspaces(out, wss)
    elsewhere = await merge_workspaces(tmp_path / "other" / "place", wss)
    assert first.commit is not None
    assert first == second == elsewhere
    assert git(out, "rev-parse", "HEAD").strip() == first.commit
    assert not (out / "RESULT.md").exists()  # the output is rebuilt, not patched
    assert "100755" in git(out, "ls-files", "-s", "c/deep/c.py")
    assert [n for n in _names(tmp_path) if n.startswith(".")] == []  # no scratch left
    assert_settled(out)


def mixed_run(root: Path) -> list[tuple[str, Path]]:
    """Clean merges, then a conflict, then clean merges again, then another conflict."""
    files = {"a": {"a.md": "a\n"}, "b": {"shared.md": "b's\n"}, "c": {"c/c.md": "c\n"},
             "d": {"d.md": "d\n"}, "e": {"shared.md": "e's\n"}, "f": {"f.md": "f\n"},
             "g": {"g.md": "g\n"}, "h": {"shared.md": "h's\n", "h.md": "h\n"}}
    return [(n, workspace(root, n, f)) for n, f in files.items()]


@pytestmark_git
@pytest.mark.anyio
async def test_clean_merges_made_without_a_checkout_equal_worktree_merges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The commit-graph is rewritten every 2 merges here, which moves main while the
    # worktree stays behind: the conflicts that follow must still start from main.
    monkeypatch.setattr(files_module, "COMMIT_GRAPH_EVERY", 2)
    wss = mixed_run(tmp_path)
    fast = await merge_workspaces(tmp_path / "fast", wss)

    async def no_merge_tree(*_: object) -> str | None:
        raise NoMergeTree("as on git < 2.38")

    monkeypatch.setattr(files_module, "clean_merge_tree", no_merge_tree)
    slow = await merge_workspaces(tmp_path / "slow", wss)
    # Every merge made from objects alone is the very commit `git merge` makes.
    assert fast == slow
    assert fast.merged == list("abcdefgh")
    assert [c.node for c in fast.conflicts] == ["e", "h"]
    out = tmp_path / "fast"
    assert_settled(out)  # the worktree shows main's final tree
    assert sorted(git(out, "ls-files").split()) == sorted(
        ["a.md", "c/c.md", "d.md", "f.md", "g.md", "h.md", "shared.md"])
    shared = (out / "shared.md").read_text()
    assert shared.startswith("b's\n") and "e's" in shared and "h's" in shared
    assert len(git(out, "rev-list", "--merges", "HEAD").split()) == 8


@pytestmark_git
@pytest.mark.anyio
async def test_empty_and_missing_workspaces_merge_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "ws" / "empty"
    (empty / "only" / "dirs").mkdir(parents=True)
    out = tmp_path / "out"
    report = await merge_workspaces(out, [("e", empty), ("m", tmp_path / "ws" / "missing")])
    assert report.merged == [] and report.files == 0 and report.conflicts == []
    assert report.commit == git(out, "rev-parse", "HEAD").strip()
    assert git(out, "branch", "--list", "node/*") == ""
    assert_settled(out)


@pytestmark_git
@pytest.mark.anyio
async def test_foreign_non_empty_output_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError):
        await merge_workspaces(out, [("a", workspace(tmp_path, "a", {"f": "x"}))])
    assert _names(out) == ["precious.txt"]


@pytestmark_git
@pytest.mark.anyio
async def test_caps_bound_all_workspaces_together(tmp_path: Path) -> None:
    wss = [(n, workspace(tmp_path, n, {f"{n}1": "1", f"{n}2": "2"})) for n in "ab"]
    report = await merge_workspaces(tmp_path / "out", wss, max_files=3)
    assert report.files == 3 and report.merged == ["a", "b"]
    (note,) = report.skipped
    assert note.startswith("b: copy stopped at b2")
    report = await merge_workspaces(tmp_path / "out", wss, max_bytes=2)
    assert report.files == 2 and report.merged == ["a"]
    assert report.skipped == ["b: .: not copied, the merge's file or byte cap is used up"]


@pytestmark_git
@pytest.mark.anyio
async def test_names_git_refuses_are_skipped_not_fatal(tmp_path: Path) -> None:
    bad = ["git~1", ".git.", "GIT~1"]
    ws = workspace(tmp_path, "a", {"good.txt": "ok\n", **{name: "x\n" for name in bad}})
    report = await merge_workspaces(tmp_path / "out", [("a", ws)])
    assert git(tmp_path / "out", "ls-files").split() == ["good.txt"]
    assert sorted(report.skipped) == sorted(f"a: {n}: a name git refuses, not copied"
                                            for n in bad)


@pytestmark_git
@pytest.mark.anyio
async def test_file_against_folder_and_odd_ids_still_settle(tmp_path: Path) -> None:
    wss = [
        ("v1..2", workspace(tmp_path, "a", {"x": "a file\n"})),
        ("v3.lock", workspace(tmp_path, "b", {"x/y": "in a folder\n"})),
    ]
    out = tmp_path / "out"
    report = await merge_workspaces(out, wss)
    assert report.merged == ["v1..2", "v3.lock"]
    assert report.conflicts[0].how.startswith("union fallback")
    assert (out / "x" / "y").read_text() == "in a folder\n"
    assert branch_name("v1..2") != "node/v1..2"
    assert len(git(out, "branch", "--list", "node/*").split()) == 2
    assert_settled(out)


@pytestmark_git
@pytest.mark.anyio
async def test_undecodable_file_names_are_reported_printably(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.txt")  # Latin-1 bytes: not UTF-8
    wss = [(n, workspace(tmp_path, n, {name: f"{n}\n"})) for n in "ab"]
    report = await merge_workspaces(tmp_path / "out", wss)
    assert report.conflicts[0].files == ["caf\ufffd.txt"]
    render_report(run_id="r", goal="g", status="done", synthesis="", nodes=[], files=report,
                  usage=Usage(), elapsed_s=0, simulated=False).encode("utf-8")
    assert no_markers((tmp_path / "out" / name).read_text(errors="replace"))


@pytestmark_git
@pytest.mark.anyio
async def test_cancelled_merge_leaves_no_output_and_no_scratch(tmp_path: Path) -> None:
    entered = anyio.Event()

    class Stuck:
        async def resolve(self, repo: Path, node: str, files: list[str]) -> bool:
            entered.set()
            await anyio.sleep_forever()
            return True

    out = tmp_path / "out"
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(merge_workspaces, out, two_editors(tmp_path), resolver=Stuck()))
        await entered.wait()  # mid-merge, conflict markers in the scratch repo
        tg.cancel_scope.cancel()
    assert _names(tmp_path) == ["ws"]


# ---- RESULT.md -----------------------------------------------------------------------------


def _report(simulated: bool) -> str:
    nodes = [
        NodeReportRow(id="a", title="Plan | scope", status="done", attempts=1, steps=3,
                      tokens=1200, summary="Wrote a | b table\nsecond line"),
        NodeReportRow(id="b", title="Build", status="done", attempts=2, steps=9, tokens=5000,
                      summary="built it", error="timeout | retried\ntraceback..."),
        NodeReportRow(id="c", title="Test", status="dead", attempts=3, steps=1, tokens=10,
                      error="SandboxError: exit 1"),
    ]
    files = FileMergeReport(
        merged=["a", "b"], files=7, commit="abc123",
        conflicts=[ConflictRecord(node="b", files=["x|y.md"], resolved=False,
                                  how="union fallback")],
        skipped=["a: passwd: link or special file, not copied"],
    )
    usage = Usage(tokens_in=123_456, tokens_out=7_890, cost_usd=1.23456, llm_calls=42, steps=13)
    return render_report(run_id="r-1", goal="Make a thing\nwell", status="done",
                         synthesis="The **answer**.", nodes=nodes, files=files, usage=usage,
                         elapsed_s=3723.0, simulated=simulated)


def test_render_report_sections_and_escaping() -> None:
    text = _report(simulated=True)
    for section in ("# swarm run r-1", "## Goal", "## Synthesis", "## Nodes",
                    "## Failures and retries", "## File merge", "## Usage and cost"):
        assert section in text
    assert "Produced with the swarm simulator: not real model output" in text
    assert "The **answer**." in text
    assert "Wrote a \\| b table" in text and "second line" not in text
    assert "Plan \\| scope" in text and "x\\|y.md" in text
    assert "`node/a`, `node/b`" in text and "union fallback" in text and "abc123" in text
    assert "timeout \\| retried" in text and "SandboxError: exit 1" in text
    assert "123,456" in text and "7,890" in text and "$1.2346" in text and "1h 02m 03s" in text
    assert "passwd: link" in text
    for line in text.splitlines():
        if line.startswith("| `"):  # a data row: exactly its columns, however odd the cells
            cells = line.replace("\\|", "").count("|") - 1
            assert cells in (7, 4)


def test_render_report_without_simulator_or_files() -> None:
    text = render_report(run_id="r", goal="g", status="failed", synthesis="", nodes=[],
                         files=None, usage=Usage(), elapsed_s=1.5, simulated=False)
    assert "simulator" not in text
    assert "No file merge was made" in text and "No nodes ran" in text and "1.5 s" in text


@pytest.mark.anyio
async def test_write_temp_files_left_by_a_killed_process_are_not_merged(tmp_path: Path) -> None:
    # A worker SIGKILLed between writing a temp file and renaming it leaves this behind.
    ws = workspace(tmp_path, "a", {"notes/a.md": "real", "notes/.a.md.swarm-0123abcd": "half"})
    out = tmp_path / "out"
    report = await merge_workspaces(out, [("a", ws)])
    assert (out / "notes" / "a.md").read_text() == "real"
    assert not (out / "notes" / ".a.md.swarm-0123abcd").exists()
    assert report.files == 1
