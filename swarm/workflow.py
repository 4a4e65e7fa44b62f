"""Workflow files: plans written by people, in YAML, loaded into a validated Plan.

No I/O beyond reading the file, checking that inputs exist and expanding globs. Every error
is one line that starts `path:line:col:` and points at the YAML that caused it, so a person
can fix the file without guessing. The format is documented in workflows/README.md.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from swarm import dag
from swarm.errors import PlanInvalid, UserError
from swarm.models import Model, NodeSpec, Plan
from swarm.workflow_source import Loc, Source, suggest

INPUTS_ROOT = "/inputs"
ITEM_VARS = ("item", "item_name", "item_rel", "index")
KNOWN_TOOLS: tuple[str, ...] = tuple(NodeSpec(id="x").tools)
_PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INPUT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_TOKEN_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


class WorkflowLoad(Model):
    """A workflow file turned into what a run needs."""

    name: str
    goal: str
    plan: Plan
    mounts: dict[str, str] = Field(
        default_factory=dict, description="container path -> host path (read-only inputs)"
    )
    description: str = ""
    params: dict[str, str] = Field(default_factory=dict, description="the values used")


class MapSpec(Model):
    """Fan-out of one node entry: one node per item."""

    glob: str | None = None
    items: list[str] | str | None = None
    over: str | None = None
    exclude: list[str] = Field(default_factory=list)
    max: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> MapSpec:
        given = [k for k in ("glob", "items", "over") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("map needs exactly one of glob, items or over")
        if self.exclude and self.glob is None:
            raise ValueError("map.exclude only applies to map.glob")
        return self


class WorkflowFile(Model):
    """The top level of a workflow file. Node entries are checked one by one later."""

    name: str | None = None
    description: str = ""
    params: dict[str, str | None] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict)
    goal: str
    nodes: list[dict[str, Any]] = Field(min_length=1)


def load_workflow(
    path: Path,
    params: Mapping[str, str] | None = None,
    *,
    max_nodes: int = 1000,
    cwd: Path | None = None,
) -> WorkflowLoad:
    """Load, expand and validate a workflow file. Relative input paths and globs start at
    `cwd` (the process's working directory by default). Raises UserError/PlanInvalid."""
    src = Source.read(path)
    doc = src.validate(WorkflowFile, _without_extensions(src.data), ())
    values = _resolve_params(src, doc.params, params or {})
    r = _Renderer(src, values)
    name = r.text(doc.name, ("name",)) if doc.name else Path(path).stem
    description = r.text(doc.description, ("description",))
    goal = r.text(doc.goal, ("goal",))
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    roots, mounts = _inputs(r, doc.inputs, base)
    entries = _entries(r, doc.nodes)
    for e in entries:
        _expand(r, e, entries, base, roots)
    _check_total(src, entries, max_nodes)
    for e in entries:
        e.specs = [_build(r, e, k) for k in range(len(e.items or [None]))]
    plan = Plan(nodes=_link(src, entries), note=f"workflow {src.file}")
    _check_cycle(src, entries, plan)
    try:
        dag.validate(plan, max_nodes=max_nodes)
    except PlanInvalid as exc:
        raise PlanInvalid(f"{src.file}: {exc}") from None
    return WorkflowLoad(
        name=name, goal=goal, plan=plan, mounts=mounts, description=description, params=values
    )


def _without_extensions(data: Any) -> Any:
    """Top-level `x-...` keys are free for YAML anchors (`x-limits: &limits {...}`)."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if not k.startswith("x-")}


def _resolve_params(
    src: Source, declared: dict[str, str | None], given: Mapping[str, str]
) -> dict[str, str]:
    for name in declared:
        if not _PARAM_RE.match(name) or name in ITEM_VARS:
            why = "is reserved for map items" if name in ITEM_VARS else "is not an identifier"
            src.fail(("params", name), f"param name {name!r} {why}", key=True)
    for name in given:
        if name not in declared:
            listed = ", ".join(declared) or "(none)"
            raise UserError(
                f"{src.file}: unknown param {name!r}{suggest(name, declared)}; "
                f"declared params: {listed}"
            )
    values = {**declared, **given}
    for name, value in values.items():
        if value is None:
            src.fail(("params", name), f"param {name!r} has no default: pass --param {name}=...")
    return {k: str(v) for k, v in values.items()}


@dataclass
class _Renderer:
    src: Source
    params: dict[str, str]

    def text(self, value: str, loc: Loc, item: Mapping[str, str] | None = None) -> str:
        out: list[str] = []
        pos = 0
        for m in _TOKEN_RE.finditer(value):
            out.append(value[pos : m.start()])
            pos = m.end()
            token, name = m.group(0), m.group(1)
            if token in ("{{", "}}"):
                out.append(token[0])
            elif name is not None and name in self.params:
                out.append(self.params[name])
            elif name is not None and item is not None and name in item:
                out.append(item[name])
            else:
                self.src.fail(loc, self._unknown(name, item), offset=m.start())
        out.append(value[pos:])
        return "".join(out)

    def _unknown(self, name: str | None, item: Mapping[str, str] | None) -> str:
        if name is None:
            return "stray brace: write '{{' or '}}' for a literal brace"
        if name in ITEM_VARS:
            return f"'{{{name}}}' is only defined in the fields of a node with map: (not its id)"
        hint = suggest(name, [*self.params, *(item or ())], "'{{{}}}'")
        listed = ", ".join(self.params) or "(none)"
        return (
            f"unknown param '{{{name}}}'{hint}; declared params: {listed} "
            "(write '{{' and '}}' for literal braces)"
        )

    def tree(self, value: Any, loc: Loc, item: Mapping[str, str] | None = None) -> Any:
        if isinstance(value, str):
            return self.text(value, loc, item)
        if isinstance(value, dict):
            return {k: self.tree(v, (*loc, k), item) for k, v in value.items()}
        if isinstance(value, list):
            return [self.tree(v, (*loc, i), item) for i, v in enumerate(value)]
        return value


# ---- inputs, node entries and their expansion -------------------------------------------


def _inputs(
    r: _Renderer, inputs: dict[str, str], base: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(input name -> absolute host path, container path -> real host path)."""
    roots: dict[str, str] = {}
    mounts: dict[str, str] = {}
    for name, raw in inputs.items():
        loc: Loc = ("inputs", name)
        if not _INPUT_RE.match(name):
            r.src.fail(loc, f"input name {name!r} must be letters, digits, '_', '.', '-'", key=True)
        host = r.text(raw, loc)
        full = os.path.abspath(os.path.join(base, os.path.expanduser(host)))
        if not os.path.exists(full):
            r.src.fail(loc, f"input {name!r}: {host!r} does not exist (relative to {base})")
        roots[name] = full
        mounts[f"{INPUTS_ROOT}/{name}"] = os.path.realpath(full)
    return roots, mounts


@dataclass
class _Entry:
    index: int
    id: str
    raw: dict[str, Any]
    map: MapSpec | None
    over: str | None = None  # map.over, rendered
    items: list[tuple[str, str]] | None = None  # (item, item_rel) per expansion
    specs: list[NodeSpec] = field(default_factory=list)
    origins: dict[str, dict[str, int]] = field(default_factory=dict)  # id -> dep -> deps index


def _entries(r: _Renderer, raws: list[dict[str, Any]]) -> list[_Entry]:
    out: list[_Entry] = []
    first: dict[str, _Entry] = {}
    for i, raw in enumerate(raws):
        loc: Loc = ("nodes", i)
        rest = dict(raw)
        raw_map, raw_id = rest.pop("map", None), rest.pop("id", None)
        if not isinstance(raw_id, str):
            r.src.fail((*loc, "id"), f"node #{i + 1} needs an 'id' (a string)")
        nid = r.text(raw_id, (*loc, "id"))
        if nid in first:
            line = r.src.line_of(("nodes", first[nid].index, "id"))
            r.src.fail((*loc, "id"), f"duplicate node id {nid!r} (first at line {line})")
        label = f"node {nid!r}: "
        spec = None if raw_map is None else r.src.validate(
            MapSpec, r.tree(raw_map, (*loc, "map")), (*loc, "map"), label=label
        )
        first[nid] = _Entry(index=i, id=nid, raw=rest, map=spec)
        out.append(first[nid])
    return out


def _expand(
    r: _Renderer, e: _Entry, entries: list[_Entry], base: str, roots: dict[str, str],
    seen: tuple[str, ...] = (),
) -> None:
    """Fill in e.items for a mapped entry (and for the entries it maps over)."""
    if e.map is None or e.items is not None:
        return
    loc: Loc = ("nodes", e.index, "map")
    if e.map.glob is not None:
        items, loc = _glob_items(r, e.map, loc, base, roots), (*loc, "glob")
    elif e.map.items is not None:
        items, loc = _list_items(r, e.map.items, (*loc, "items")), (*loc, "items")
    else:
        items, loc = _over_items(r, e, entries, base, roots, seen), (*loc, "over")
    if len(items) > e.map.max:
        r.src.fail(loc, f"node {e.id!r}: {len(items)} items, over map.max of {e.map.max} "
                        "(raise max: or narrow the map)")
    e.items = items


def _glob_items(
    r: _Renderer, spec: MapSpec, loc: Loc, base: str, roots: dict[str, str]
) -> list[tuple[str, str]]:
    assert spec.glob is not None
    pattern, excludes = spec.glob, spec.exclude
    full = pattern if os.path.isabs(pattern) else os.path.join(globlib.escape(base), pattern)
    found = sorted({os.path.abspath(p) for p in globlib.glob(full, recursive=True)})
    if not found:
        r.src.fail((*loc, "glob"), f"glob {pattern!r} matched nothing (relative to {base})")
    items: list[tuple[str, str]] = []
    for path in found:
        inside = _inside(path, roots)
        if inside is None:
            r.src.fail((*loc, "glob"), f"glob {pattern!r} matched {path!r}, outside every "
                                       "input: declare an input that contains it")
        name, rel = inside
        if not any(fnmatch.fnmatchcase(rel, x) for x in excludes):
            sandbox = f"{INPUTS_ROOT}/{name}" + ("" if rel == "." else f"/{rel}")
            items.append((sandbox, rel))
    if not items:
        r.src.fail((*loc, "glob"), f"glob {pattern!r}: all {len(found)} matches are excluded")
    return items


def _inside(path: str, roots: dict[str, str]) -> tuple[str, str] | None:
    """(input name, path relative to it) for the innermost input holding `path`."""
    best: tuple[str, str] | None = None
    for name, root in roots.items():
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            if best is None or len(root) > len(roots[best[0]]):
                best = (name, Path(os.path.relpath(path, root)).as_posix())
    return best


def _list_items(r: _Renderer, raw: list[str] | str, loc: Loc) -> list[tuple[str, str]]:
    if isinstance(raw, str):  # one string (often a param): split on commas and newlines
        values = [v.strip() for v in re.split(r"[,\n]", raw) if v.strip()]
    else:
        values = [v.strip() for v in raw]
        for j, v in enumerate(values):
            if not v:
                r.src.fail((*loc, j), "map item is empty")
    if not values:
        r.src.fail(loc, "map.items is empty")
    return [(v, v) for v in values]


def _over_items(
    r: _Renderer, e: _Entry, entries: list[_Entry], base: str, roots: dict[str, str],
    seen: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    assert e.map is not None and e.map.over is not None
    loc: Loc = ("nodes", e.index, "map", "over")
    name = e.over = e.map.over
    target = next((t for t in entries if t.id == name and t.map is not None), None)
    if target is None:
        mapped = [t.id for t in entries if t.map is not None and t is not e]
        r.src.fail(loc, f"node {e.id!r}: map.over {name!r} is not a node with map:"
                        f"{suggest(name, mapped)}")
    if target is e or target.id in seen:
        r.src.fail(loc, f"node {e.id!r}: map.over loops: {' -> '.join([*seen, e.id, name])}")
    _expand(r, target, entries, base, roots, (*seen, e.id))
    assert target.items is not None
    return target.items


def _check_total(src: Source, entries: list[_Entry], max_nodes: int) -> None:
    total = sum(len(e.items) if e.items is not None else 1 for e in entries)
    if total > max_nodes:
        fans = sorted((e for e in entries if e.items), key=lambda e: -len(e.items or []))
        widest = ", ".join(f"{e.id}: {len(e.items or [])}" for e in fans[:3])
        src.fail(("nodes",), f"workflow expands to {total} nodes, over the limit of "
                             f"{max_nodes}" + (f" ({widest})" if widest else ""),
                 key=True, cls=PlanInvalid)


def _build(r: _Renderer, e: _Entry, k: int) -> NodeSpec:
    loc: Loc = ("nodes", e.index)
    item, nid = None, e.id
    if e.items is not None:
        width = max(3, len(str(len(e.items))))
        index = f"{k + 1:0{width}d}"
        value, rel = e.items[k]
        name = posixpath.basename(value.rstrip("/")) or value
        item = {"item": value, "item_name": name, "item_rel": rel, "index": index}
        nid = f"{e.id}-{index}"
    data = r.tree(e.raw, loc, item)
    if data.get("kind") == "merge":
        data.setdefault("role", "merger")
    spec = r.src.validate(NodeSpec, {"id": nid, **data}, loc, label=f"node {e.id!r}: ",
                          extra=("map",))
    _check_kind(r.src, e, spec)
    return spec


def _check_kind(src: Source, e: _Entry, spec: NodeSpec) -> None:
    loc: Loc = ("nodes", e.index)
    given = spec.model_fields_set
    for j, tool in enumerate(spec.tools):
        if tool not in KNOWN_TOOLS:
            src.fail((*loc, "tools", j), f"node {e.id!r}: unknown tool {tool!r}"
                     f"{suggest(tool, KNOWN_TOOLS)}; tools: {', '.join(KNOWN_TOOLS)}")
    if spec.kind == "command" and not (spec.command or "").strip():
        src.fail((*loc, "kind"), f"command node {e.id!r} needs a 'command'")
    if spec.kind == "swarm" and not (spec.goal or spec.instructions):
        src.fail((*loc, "kind"), f"swarm node {e.id!r} needs a 'goal'")
    if spec.kind == "merge" and not spec.deps:
        src.fail((*loc, "kind"), f"merge node {e.id!r} needs 'deps' to merge")
    for name, kind in (("command", "command"), ("check", "command"), ("goal", "swarm")):
        if name in given and spec.kind != kind:
            src.fail((*loc, name), f"node {e.id!r}: '{name}' only applies to kind: {kind} "
                                   f"(this node is kind: {spec.kind})", key=True)


def _link(src: Source, entries: list[_Entry]) -> list[NodeSpec]:
    """Replace deps on mapped nodes by their expansions; unknown deps are errors here."""
    expanded = {e.id: [s.id for s in e.specs] for e in entries if e.items is not None}
    concrete: dict[str, _Entry] = {}
    for e in entries:
        for spec in e.specs:
            if spec.id in concrete and concrete[spec.id] is not e:
                line = src.line_of(("nodes", concrete[spec.id].index, "id"))
                src.fail(("nodes", e.index, "id"),
                         f"duplicate node id {spec.id!r} (also from line {line})", cls=PlanInvalid)
            concrete[spec.id] = e
    names = [e.id for e in entries]
    out: list[NodeSpec] = []
    for e in entries:
        for k, spec in enumerate(e.specs):
            origin: dict[str, int] = {}
            for j, dep in enumerate(spec.deps):
                if dep in expanded:
                    targets = [expanded[dep][k]] if dep == e.over else expanded[dep]
                elif dep in concrete:
                    targets = [dep]
                else:
                    src.fail(("nodes", e.index, "deps", j), f"node {e.id!r} depends on unknown "
                             f"node {dep!r}{suggest(dep, names)}", cls=PlanInvalid)
                for t in targets:
                    origin.setdefault(t, j)
            e.origins[spec.id] = origin
            out.append(spec.model_copy(update={"deps": list(origin)}))
    return out


def _check_cycle(src: Source, entries: list[_Entry], plan: Plan) -> None:
    cycle = dag.find_cycle(plan.nodes)
    if not cycle:
        return
    owner = next(e for e in entries if cycle[0] in e.origins)
    j = owner.origins[cycle[0]][cycle[1]]
    src.fail(("nodes", owner.index, "deps", j), "cycle: " + " -> ".join(cycle), cls=PlanInvalid)
