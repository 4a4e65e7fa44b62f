"""Workflow files: the shipped workflows load, expansion and deps are right, and every error
names the exact file:line:col of its cause."""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from pathlib import Path

import pytest

from swarm import dag
from swarm.errors import NotFound, PlanInvalid, UserError
from swarm.workflow import WorkflowLoad, load_workflow

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "workflows"
SHIPPED = sorted((ROOT / "workflows").glob("*.yaml"))


def write(folder: Path, text: str, name: str = "wf.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def ids(wl: WorkflowLoad) -> list[str]:
    return [n.id for n in wl.plan.nodes]


def fails(path: Path, where: str, *, cls: type[Exception] = UserError, **kw: object) -> str:
    """Load `path`, expect `cls`, check the message starts `path:where: ` and return the rest."""
    with pytest.raises(cls) as info:
        load_workflow(path, **kw)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg
    prefix = f"{path}:{where}: "
    assert msg.startswith(prefix), msg
    return msg[len(prefix) :]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small repository: visible files, a hidden folder, and a package with tests."""
    for rel in ["a.py", "b.txt", "pkg/c.py", "pkg/sub/d.py", ".venv/e.py", "pkg/.f.py",
                "build/g.py"]:
        (tmp_path / "repo" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / rel).write_text("x = 1\n")
    return tmp_path


# ---- the shipped workflows ---------------------------------------------------------------


def test_workflows_are_shipped() -> None:
    names = {p.name for p in SHIPPED}
    assert {"review-python.yaml", "test-diagnose.yaml", "research.yaml"} <= names
    assert (ROOT / "workflows" / "README.md").is_file()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_workflow_loads_with_defaults(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    wl = load_workflow(Path("workflows") / path.name)
    dag.validate(wl.plan, max_nodes=1000)
    assert wl.name == path.stem
    assert wl.goal and "{" not in wl.goal
    for node in wl.plan.nodes:
        assert node.instructions or node.command, node.id
    for container, host in wl.mounts.items():
        assert container.startswith("/inputs/")
        assert host == str(ROOT)


def test_review_python_maps_every_python_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    wl = load_workflow(Path("workflows/review-python.yaml"))
    excluded = ("build/*", "dist/*", "*/node_modules/*")  # as in the workflow
    files = sorted(
        os.path.abspath(p) for p in glob.glob("./**/*.py", recursive=True)
        if not any(fnmatch.fnmatchcase(os.path.relpath(p), x) for x in excluded)
    )
    reviews = [n for n in wl.plan.nodes if n.id.startswith("review-")]
    assert len(reviews) == len(files)
    assert [n.id for n in reviews] == [f"review-{i:03d}" for i in range(1, len(files) + 1)]
    expected = ["/inputs/repo/" + os.path.relpath(f, ROOT) for f in files]
    assert [n.instructions.split()[4] for n in reviews] == expected
    assert "/inputs/repo/tests/test_workflow.py" in expected
    assert reviews[0].title == f"Review {os.path.relpath(files[0], ROOT)}"
    by_id = wl.plan.by_id()
    assert by_id["report"].deps == [*(n.id for n in reviews), "tests"]
    assert by_id["report"].kind == "merge" and by_id["report"].role == "merger"
    assert by_id["tests"].kind == "command" and by_id["tests"].check is False
    assert wl.mounts == {"/inputs/repo": str(ROOT)}


def test_test_diagnose_pairs_each_diagnosis_with_its_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    wl = load_workflow(Path("workflows/test-diagnose.yaml"))
    by_id = wl.plan.by_id()
    runs = [n for n in wl.plan.nodes if n.id.startswith("run-")]
    diagnoses = [n for n in wl.plan.nodes if n.id.startswith("diagnose-")]
    assert runs and len(runs) == len(diagnoses)
    for run, diagnosis in zip(runs, diagnoses, strict=True):
        assert run.kind == "command" and run.check is False and run.network is False
        assert diagnosis.deps == [run.id]
        target = run.title.removeprefix("pytest ")
        assert f"python3 -m pytest -q -p no:cacheprovider {target} " in (run.command or "")
        assert target in diagnosis.instructions
    assert "tests/test_workflow.py" in {r.title.removeprefix("pytest ") for r in runs}
    assert by_id["diagnosis"].deps == [d.id for d in diagnoses]


def test_test_diagnose_params_reach_booleans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    wl = load_workflow(
        Path("workflows/test-diagnose.yaml"),
        {"network": "true", "setup": "pip install -q pytest", "tests": "tests/test_workflow.py"},
    )
    run = wl.plan.by_id()["run-001"]
    assert run.network is True
    assert "pip install -q pytest > /tmp/setup.out" in (run.command or "")
    assert ids(wl) == ["run-001", "diagnose-001", "diagnosis"]


def test_research_fans_out_over_angles_of_the_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    wl = load_workflow(Path("workflows/research.yaml"), {"topic": "zebra migration"})
    angles = [n for n in wl.plan.nodes if n.id.startswith("angle-")]
    assert len(angles) >= 3
    assert all("zebra migration" in n.instructions for n in angles)
    assert wl.goal == "Write a well-founded research brief on zebra migration."
    assert wl.plan.by_id()["brief"].deps == [n.id for n in angles]
    assert wl.mounts == {}
    assert wl.params["topic"] == "zebra migration"


# ---- expansion, variables and deps -------------------------------------------------------

MAPPED = """\
name: mapped
params:
  repo: repo
inputs:
  code: "{repo}"
goal: "Review {repo}"
nodes:
  - id: review
    map:
      glob: "{repo}/**/*.py"
      exclude: ["build/*"]
    title: "{index} {item_name}"
    instructions: "Read {item} ({item_rel}) from {repo}"
  - id: summary
    deps: [review]
    instructions: "Summarise"
"""


def test_glob_expansion_variables_and_deps(tree: Path) -> None:
    wl = load_workflow(write(tree, MAPPED), cwd=tree)
    assert ids(wl) == ["review-001", "review-002", "review-003", "summary"]
    by_id = wl.plan.by_id()
    assert [by_id[f"review-00{i}"].instructions for i in (1, 2, 3)] == [
        "Read /inputs/code/a.py (a.py) from repo",
        "Read /inputs/code/pkg/c.py (pkg/c.py) from repo",
        "Read /inputs/code/pkg/sub/d.py (pkg/sub/d.py) from repo",
    ]
    assert by_id["review-003"].title == "003 d.py"
    assert by_id["summary"].deps == ["review-001", "review-002", "review-003"]
    assert wl.mounts == {"/inputs/code": str((tree / "repo").resolve())}
    assert wl.goal == "Review repo"


def test_glob_of_folders_and_absolute_input(tree: Path) -> None:
    text = MAPPED.replace('"{repo}/**/*.py"', '"{repo}/*/"').replace('exclude: ["build/*"]',
                                                                      'exclude: ["build"]')
    wl = load_workflow(write(tree, text), {"repo": str(tree / "repo")}, cwd=Path("/"))
    assert [n.instructions.split()[1] for n in wl.plan.nodes[:-1]] == ["/inputs/code/pkg"]


def test_index_is_padded_to_the_widest_expansion(tmp_path: Path) -> None:
    items = ", ".join(str(i) for i in range(1000))
    text = f"goal: g\nnodes:\n  - id: n\n    map: {{items: [{items}], max: 1000}}\n"
    wl = load_workflow(write(tmp_path, text), max_nodes=1000)
    assert ids(wl)[0] == "n-0001" and ids(wl)[-1] == "n-1000"


def test_items_list_string_split_and_over_pairs(tmp_path: Path) -> None:
    text = """\
params:
  topics: "alpha, beta,gamma"
goal: g
nodes:
  - id: ask
    map: {items: "{topics}"}
    instructions: "Research {item} ({index})"
  - id: check
    map: {over: ask}
    deps: [ask, extra]
    instructions: "Check {item}"
  - id: extra
    map:
      items: ["3.10", "yes", "a/b/"]
    instructions: "{item_name}"
  - id: last
    kind: merge
    deps: [check, ask-002]
"""
    wl = load_workflow(write(tmp_path, text))
    by_id = wl.plan.by_id()
    assert [by_id[f"ask-00{i}"].instructions for i in (1, 2, 3)] == [
        "Research alpha (001)", "Research beta (002)", "Research gamma (003)"]
    assert by_id["check-002"].deps == ["ask-002", "extra-001", "extra-002", "extra-003"]
    assert by_id["check-003"].instructions == "Check gamma"
    assert [by_id[f"extra-00{i}"].instructions for i in (1, 2, 3)] == ["3.10", "yes", "b"]
    assert by_id["last"].deps == ["check-001", "check-002", "check-003", "ask-002"]


def test_params_override_defaults_and_escaped_braces(tmp_path: Path) -> None:
    text = """\
name: "{who}-job"
params: {who: world, n: "3"}
goal: "Greet {who}"
nodes:
  - id: hello
    kind: command
    command: "echo {{who}} {who} | awk '{{print $1}}'"
    limits: {max_attempts: "{n}"}
"""
    path = write(tmp_path, text)
    wl = load_workflow(path)
    assert (wl.name, wl.goal) == ("world-job", "Greet world")
    assert wl.plan.nodes[0].command == "echo {who} world | awk '{print $1}'"
    assert wl.plan.nodes[0].limits.max_attempts == 3
    wl = load_workflow(path, {"who": "you", "n": "1"})
    assert (wl.name, wl.goal, wl.plan.nodes[0].limits.max_attempts) == ("you-job", "Greet you", 1)
    assert wl.params == {"who": "you", "n": "1"}


def test_node_defaults_and_overrides(tmp_path: Path) -> None:
    text = """\
goal: g
nodes:
  - id: plain
  - id: custom
    role: planner
    tools: [read_file, finish]
    network: yes
    limits: {max_steps: 5}
  - id: nested
    kind: swarm
    goal: "a smaller goal"
  - id: merge
    kind: merge
    deps: [plain, custom, nested]
"""
    by_id = load_workflow(write(tmp_path, text)).plan.by_id()
    assert by_id["plain"].role == "worker" and by_id["plain"].kind == "agent"
    assert by_id["plain"].tools == ["shell", "read_file", "write_file", "list_files", "finish"]
    assert by_id["custom"].tools == ["read_file", "finish"] and by_id["custom"].network is True
    assert by_id["custom"].role == "planner" and by_id["custom"].limits.max_steps == 5
    assert by_id["nested"].goal == "a smaller goal"
    assert by_id["merge"].role == "merger"


def test_anchors_aliases_and_merge_keys(tmp_path: Path) -> None:
    text = """\
x-limits: &limits {max_steps: 3}
goal: g
nodes:
  - &base
    id: a
    limits: *limits
  - <<: *base
    id: b
"""
    nodes = load_workflow(write(tmp_path, text)).plan.nodes
    assert [(n.id, n.limits.max_steps) for n in nodes] == [("a", 3), ("b", 3)]


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    wl = load_workflow(write(tmp_path, "goal: g\nnodes: [{id: a}]\n", "my-flow.yaml"))
    assert wl.name == "my-flow" and wl.description == ""


# ---- errors: exact file:line:col ----------------------------------------------------------


def test_error_yaml_syntax() -> None:
    msg = fails(DATA / "syntax.yaml", "6:4")
    assert msg.startswith("YAML syntax error: expected <block end>")


def test_error_unknown_field_with_suggestion() -> None:
    msg = fails(DATA / "unknown_field.yaml", "7:5")
    assert msg == "node 'build': unknown field 'comand' (did you mean 'command'?)"


def test_error_unknown_dependency() -> None:
    msg = fails(DATA / "unknown_dep.yaml", "10:20", cls=PlanInvalid)
    assert msg == "node 'report' depends on unknown node 'reviw' (did you mean 'review'?)"


def test_error_cycle_names_the_cycle() -> None:
    msg = fails(DATA / "cycle.yaml", "5:12", cls=PlanInvalid)
    assert msg == "cycle: a -> c -> b -> a"


def test_error_unknown_param_in_a_block_scalar() -> None:
    msg = fails(DATA / "unknown_param.yaml", "9:18")
    assert msg.startswith("unknown param '{rpo}' (did you mean '{repo}'?); declared params: repo")


def test_error_glob_with_no_matches() -> None:
    msg = fails(DATA / "no_match.yaml", "10:13", cwd=DATA)
    assert msg.startswith("glob './**/*.nothing' matched nothing")


def test_error_bad_kind() -> None:
    msg = fails(DATA / "bad_kind.yaml", "7:11")
    assert msg == ("node 'b': unknown kind 'merg' (did you mean 'merge'?); "
                   "expected one of: agent, command, swarm, merge")


def test_error_too_many_nodes() -> None:
    msg = fails(DATA / "too_many.yaml", "3:1", cls=PlanInvalid, max_nodes=5)
    assert msg == "workflow expands to 6 nodes, over the limit of 5 (one: 5)"
    assert len(load_workflow(DATA / "too_many.yaml", max_nodes=6).plan.nodes) == 6


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        ("goal: g\nnodes:\n  - id: a\n    title: x\n    title: y\n", "5:5",
         "duplicate key 'title' (first at line 4)"),
        ("goal: g\nnodes:\n  - id: a\n  - id: a\n", "4:9",
         "duplicate node id 'a' (first at line 3)"),
        ("goal: g\nnodes:\n  - id: a\n    limits: {max_step: 3}\n", "4:14",
         "node 'a': unknown field 'max_step' (did you mean 'max_steps'?)"),
        ("goal: g\nnodes:\n  - id: a\n    limits:\n      max_steps: 0\n", "5:18",
         "node 'a': limits.max_steps: Input should be greater than or equal to 1"),
        ("goal: g\nnodes:\n  - id: a\n    tools: [shell, fnish]\n", "4:20",
         "node 'a': unknown tool 'fnish' (did you mean 'finish'?); "
         "tools: shell, read_file, write_file, list_files, finish"),
        ("goal: g\nnodes:\n  - id: a\n    kind: command\n", "4:11",
         "command node 'a' needs a 'command'"),
        ("goal: g\nnodes:\n  - id: a\n    command: ls\n", "4:5",
         "node 'a': 'command' only applies to kind: command (this node is kind: agent)"),
        ("goal: g\nnodes:\n  - id: a\n    kind: merge\n", "4:11",
         "merge node 'a' needs 'deps' to merge"),
        ("goal: g\nnodes:\n  - title: a\n", "3:5", "node #1 needs an 'id' (a string)"),
        ("goal: g\nnodes:\n  - id: 'a b'\n", "3:9",
         "node 'a b': id: node id 'a b' must be 1-100 chars of letters, digits, "
         "'_', '.', '-'"),
        ("nodes:\n  - id: a\n", "1:1", "missing field 'goal'"),
        ("goal: g\nnodes: []\n", "2:8", "nodes: List should have at least 1 item after validation, "
         "not 0"),
        ("goal: g\nnodes:\n  - id: a\n    instructions: 'say {hi'\n", "4:24",
         "stray brace: write '{{' or '}}' for a literal brace"),
        ("goal: '{item}'\nnodes:\n  - id: a\n", "1:8",
         "'{item}' is only defined in the fields of a node with map: (not its id)"),
        ("goal: g\nnodes:\n  - id: 'r-{item}'\n    map: {items: [a]}\n", "3:12",
         "'{item}' is only defined in the fields of a node with map: (not its id)"),
        ("goal: g\nnodes: [review]\n", "2:9", "nodes[0]: expected a mapping"),
        ("goal: g\nnodes:\n  - id: a\n  - id: b\n    deps: a\n", "5:11",
         "node 'b': deps: expected a list"),
        ("goal: g\nnodes:\n  - id: a\n    check: false\n", "4:5",
         "node 'a': 'check' only applies to kind: command (this node is kind: agent)"),
        ("goal: g\nnodes:\n  - id: a\n    map: {items: []}\n", "4:18", "map.items is empty"),
        ("goal: g\nnodes:\n  - id: a\n    map: {items: [x], glob: y}\n", "4:10",
         "node 'a': map needs exactly one of glob, items or over"),
        ("goal: g\nnodes:\n  - id: a\n    map: {items: [x, y, z], max: 2}\n", "4:18",
         "node 'a': 3 items, over map.max of 2 (raise max: or narrow the map)"),
        ("goal: g\nnodes:\n  - id: a\n  - id: b\n    map: {over: a}\n", "5:17",
         "node 'b': map.over 'a' is not a node with map:"),
        ("goal: g\nnodes:\n  - id: a\n    map: {over: b}\n  - id: b\n    map: {over: a}\n",
         "6:17", "node 'b': map.over loops: a -> b -> a"),
        ("goal: g\nnodes:\n  - id: a\n    deps: [a]\n", "4:12", "cycle: a -> a"),
        ("params: {item: x}\ngoal: g\nnodes: [{id: a}]\n", "1:10",
         "param name 'item' is reserved for map items"),
        ("params: {p: ~}\ngoal: g\nnodes: [{id: a}]\n", "1:13",
         "param 'p' has no default: pass --param p=..."),
        ("inputs: {data: ./missing}\ngoal: g\nnodes: [{id: a}]\n", "1:16",
         "input 'data': './missing' does not exist"),
        ("- just a list\n", "1:1", "expected a mapping"),
        ("goal: g\nnodes:\n  - id: a\n    deps: [b]\n  - id: b\n    deps: [a]\n", "4:12",
         "cycle: a -> b -> a"),
    ],
)
def test_error_locations(tmp_path: Path, text: str, where: str, expected: str) -> None:
    msg = fails(write(tmp_path, text), where, cwd=tmp_path)
    assert msg.startswith(expected), msg


def test_error_glob_outside_every_input(tree: Path) -> None:
    text = MAPPED.replace('inputs:\n  code: "{repo}"', 'inputs:\n  code: "{repo}/pkg"')
    msg = fails(write(tree, text), "10:13", cwd=tree)
    assert re.match(r"glob 'repo/\*\*/\*\.py' matched '.*/repo/a\.py', outside every input", msg)


def test_error_all_glob_matches_excluded(tree: Path) -> None:
    text = MAPPED.replace('exclude: ["build/*"]', 'exclude: ["*"]')
    msg = fails(write(tree, text), "10:13", cwd=tree)
    assert msg == "glob 'repo/**/*.py': all 4 matches are excluded"


def test_error_unknown_param_given_on_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, "params: {repo: .}\ngoal: g\nnodes: [{id: a}]\n")
    with pytest.raises(UserError) as info:
        load_workflow(path, {"rep": "x"})
    assert str(info.value) == (
        f"{path}: unknown param 'rep' (did you mean 'repo'?); declared params: repo"
    )


def test_error_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such workflow file"):
        load_workflow(tmp_path / "nope.yaml")
    fails(write(tmp_path, "# nothing\n"), "1:1")
    assert fails(write(tmp_path, "a: 1\n---\nb: 2\n"), "2:1").startswith("YAML syntax error")
