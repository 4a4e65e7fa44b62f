"""What the simulated model says: configuration and deterministic replies. Pure, no I/O.

Every decision is a hash of (seed, run, node, step, attempt) -- never of arrival order -- so
runs reproduce under any concurrency and a retried request eventually succeeds. The HTTP
server around it is `simulator.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from swarm.errors import UserError

MODEL = "swarm-sim"
LABEL = "[simulated]"
TRANSPORT_FAULTS = ("429", "500", "hang", "garbage")
FAULT_KINDS = (*TRANSPORT_FAULTS, "malformed", "unknown_tool")
_SPEC_FIELDS = {
    "429": "rate_429", "500": "rate_500", "hang": "rate_hang", "garbage": "rate_garbage",
    "malformed": "rate_malformed", "unknown_tool": "rate_unknown_tool",
    "retry_after": "retry_after_s", "hang_s": "hang_s",
}
Rate = Annotated[float, Field(ge=0, le=1)]


class SimConfig(BaseModel):
    seed: int = 0
    latency_ms: float = Field(default=0, ge=0)
    tool_steps: int = Field(default=2, ge=0, description="Acting tool calls before `finish`.")
    rate_429: Rate = 0.0
    retry_after_s: float = Field(default=1.0, ge=0)
    rate_500: Rate = 0.0
    rate_hang: Rate = 0.0
    hang_s: float = Field(default=600.0, gt=0, description="Longer than any client timeout.")
    rate_garbage: Rate = 0.0
    rate_malformed: Rate = 0.0
    rate_unknown_tool: Rate = 0.0
    fault_attempts: int | None = Field(
        default=None, ge=0,
        description="Inject faults only into the first N attempts of a (run, node, step).",
    )
    reasoning: bool = Field(
        default=False,
        description="Emit reasoning_content and, like strict providers, answer 400 to a "
        "transcript whose assistant turns dropped it.",
    )

    @model_validator(mode="after")
    def _rates_fit(self) -> SimConfig:
        if self.rate_429 + self.rate_500 + self.rate_hang + self.rate_garbage > 1:
            raise ValueError("429, 500, hang and garbage rates add up to more than 1")
        if self.rate_malformed + self.rate_unknown_tool > 1:
            raise ValueError("malformed and unknown_tool rates add up to more than 1")
        return self

    @classmethod
    def from_spec(cls, spec: str, **fields: Any) -> SimConfig:
        """Config from CLI flags: `spec` like "429=0.1,500=0.05,hang=0.01,malformed=0.05"."""
        try:
            return cls(**{**fields, **parse_fault_spec(spec)})
        except ValidationError as e:
            raise UserError(f"bad simulator settings: {e.errors()[0]['msg']}") from None


def parse_fault_spec(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in _SPEC_FIELDS:
            raise UserError(
                f"bad fault {item!r}: expected KIND=VALUE, KIND one of {', '.join(_SPEC_FIELDS)}"
            )
        try:
            out[_SPEC_FIELDS[name]] = float(value)
        except ValueError:
            raise UserError(f"bad fault {item!r}: {value!r} is not a number") from None
    return out


@dataclass
class Turn:
    """One request, as the simulator sees it."""

    run: str
    node: str
    step: int  # assistant messages already in the transcript
    attempt: int  # earlier requests for this same (run, node, step)
    messages: list[dict[str, Any]]
    tools: dict[str, dict[str, Any]]  # offered tool name -> its function schema


@dataclass
class Reply:
    content: str
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, name, arguments)
    reasoning: str | None = None

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.calls else "stop"


def stable_hash(*parts: object) -> int:
    data = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _unit(*parts: object) -> float:
    return stable_hash(*parts) / 2.0**64


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _find(messages: list[dict[str, Any]], role: str, *, last: bool) -> str:
    seq = reversed(messages) if last else iter(messages)
    return next((_text(m.get("content")) for m in seq if m.get("role") == role), "")


def _excerpt(text: str, words: int = 10) -> str:
    return " ".join(text.replace(LABEL, "").split()[:words])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    n = 0
    for m in messages:
        n += len(_text(m.get("content")))
        for call in m.get("tool_calls") or ():
            n += len(str((call.get("function") or {}).get("arguments", "")))
    return n


def missing_reasoning(messages: list[dict[str, Any]]) -> int | None:
    """Index of the first assistant message without reasoning_content, if any."""
    return next((i for i, m in enumerate(messages)
                 if m.get("role") == "assistant" and not m.get("reasoning_content")), None)


def _faulty(cfg: SimConfig, t: Turn) -> bool:
    return cfg.fault_attempts is None or t.attempt < cfg.fault_attempts


def transport_fault(cfg: SimConfig, t: Turn) -> str | None:
    """The HTTP-level fault for this request (one of TRANSPORT_FAULTS), or None."""
    if not _faulty(cfg, t):
        return None
    u = _unit(cfg.seed, t.run, t.node, t.step, t.attempt, "transport")
    for kind, rate in zip(TRANSPORT_FAULTS, (cfg.rate_429, cfg.rate_500, cfg.rate_hang,
                                             cfg.rate_garbage), strict=True):
        if u < rate:
            return kind
        u -= rate
    return None


def reply_for(cfg: SimConfig, t: Turn) -> tuple[Reply, str | None]:
    """The answer, by mode (which tools are offered), and the content fault injected, if any."""
    if "submit_plan" in t.tools:
        reply = _plan(cfg, t)
    elif "finish" in t.tools:
        reply = _act(cfg, t)
    elif t.tools:
        reply = Reply(f"{LABEL} No simulated behaviour for tools {sorted(t.tools)}.")
    else:
        reply = _synthesize(cfg, t)
    if cfg.reasoning:
        reply.reasoning = (f"{LABEL} thinking about {t.node} step {t.step}: "
                           f"{stable_hash(cfg.seed, t.run, t.node, t.step):016x}")
    return _corrupt(cfg, t, reply)


# ---- planning ------------------------------------------------------------------------------

_PARTS_RE = re.compile(r"(\d+)\s+(?:parts|pieces|sections|subtasks|agents)\b", re.I)
_ITEM_RE = re.compile(r"^\s*(?:[-*]|\d+[.)])\s+(\S.*?)\s*$", re.M)
_LIMIT_RE = re.compile(r"limit of (\d+)")


def _node(nid: str, title: str, instructions: str, deps: list[str], **kw: str) -> dict[str, Any]:
    return {"id": nid, "title": title, "instructions": instructions, "deps": deps,
            "kind": kw.get("kind", "agent"), "role": kw.get("role", "worker")}


def _fan_in(work: list[tuple[str, str, str]], goal: str, deps: list[str]) -> list[dict[str, Any]]:
    nodes = [_node(i, t, text, list(deps)) for i, t, text in work]
    ids = [n["id"] for n in nodes]
    merge = _node("merge", "Merge", f"Combine the {len(ids)} results into one answer to: {goal}",
                  ids, kind="merge", role="merger")
    return [*nodes, merge]


def _list_items(goal: str) -> list[str]:
    items: list[str] = _ITEM_RE.findall(goal)
    if len(items) >= 2:
        return items
    _, colon, tail = goal.partition(":")
    lines = tail.strip().splitlines()
    if not colon or not lines:
        return []
    parts = [p.strip(" .;\t") for p in re.split(r",|;|\band\b", lines[0])]
    parts = [p for p in parts if p]
    return parts if len(parts) >= 2 else []


def plan_for(goal: str, max_nodes: int | None = None) -> list[dict[str, Any]]:
    """The nodes the simulator plans for `goal` (public so tests and benches can predict it)."""
    cap = max(2, max_nodes or 100_000) - 1  # leave room for the merge node
    if m := _PARTS_RE.search(goal):
        n = max(1, min(int(m.group(1)), cap))
        w = max(3, len(str(n)))
        return _fan_in([(f"part-{i:0{w}d}", f"Part {i} of {n}", f"Do part {i} of {n} of: {goal}")
                        for i in range(1, n + 1)], goal, [])
    if items := _list_items(goal)[:cap]:
        return _fan_in([(f"item-{i:03d}-{_slug(t)}".rstrip("-"), t[:80],
                         f"{t}\n\n(Part of: {goal})") for i, t in enumerate(items, 1)], goal, [])
    research = _node("research", "Research", f"Gather what is needed for: {goal}", [])
    sections = [(f"section-{i}", f"Section {i} of 3", f"Write section {i} of 3 of: {goal}")
                for i in (1, 2, 3)]
    return [research, *_fan_in(sections, goal, ["research"])]


def _revise(request: str) -> list[dict[str, Any]]:
    """A revision (the planner's REPLAN request ends with a JSON report): keep every node and
    add a retry of each dead one, under a new id, that pending dependents then wait for."""
    try:
        report = json.loads(request.rsplit("\n", 1)[-1])
        nodes: list[dict[str, Any]] = report["plan"]["nodes"]
        dead = set(report.get("dead") or ())
    except (ValueError, KeyError, TypeError):
        return plan_for(request)
    ids = {n["id"] for n in nodes}
    renamed: dict[str, str] = {}
    for d in sorted(dead):
        new = next(f"{d}-r{k}" for k in range(1, len(ids) + 2) if f"{d}-r{k}" not in ids)
        ids.add(new)
        renamed[d] = new
    kept = [{**n, "deps": [renamed.get(x, x) for x in n.get("deps", ())]} for n in nodes]
    retries = [{**n, "id": renamed[n["id"]],
                "title": n.get("title", "").replace(FAIL_DIRECTIVE, "").strip(),
                "instructions": f"Retry of {n['id']}, which failed: take a different, smaller "
                                f"approach. "
                                + n.get("instructions", "").replace(FAIL_DIRECTIVE, "")}
               for n in kept if n["id"] in renamed]
    return [*kept, *retries]


def _call_id(cfg: SimConfig, t: Turn) -> str:
    return f"call_{stable_hash(cfg.seed, t.run, t.node, t.step, t.attempt, 'call'):016x}"


def _plan(cfg: SimConfig, t: Turn) -> Reply:
    goal = _find(t.messages, "user", last=True)
    last = t.messages[-1] if t.messages else {}
    limit = None
    if last.get("role") == "tool" and (m := _LIMIT_RE.search(_text(last.get("content")))):
        limit = int(m.group(1))  # the last plan broke a size limit: fit under it
    nodes = _revise(goal) if goal.startswith("REPLAN") else plan_for(goal, limit)
    return Reply(f"{LABEL} A plan of {len(nodes)} nodes.",
                 [(_call_id(cfg, t), "submit_plan", json.dumps({"nodes": nodes}))])


# ---- acting --------------------------------------------------------------------------------

_ERROR_RE = re.compile(r"error|invalid|unknown tool|not valid json", re.I)


def _prop(schema: dict[str, Any], names: tuple[str, ...]) -> str:
    """The argument name a tool's schema uses for a concept (`path`, `file_path`, ...)."""
    props = (schema.get("parameters") or {}).get("properties") or {}
    return next((n for n in names if n in props), names[0])


# Directives a test or demo can put in a goal or instructions to script the simulator.
FAIL_DIRECTIVE = "[sim:fail]"  # the agent answers nothing, every time: the node fails
REPEAT_DIRECTIVE = "[sim:repeat]"  # the agent makes the same shell call forever
_WRITE_RE = re.compile(r"\[sim:write ([^\]\s]+)\]")  # first write goes to this shared path
# The merge agent's prompt shows each conflicted file between these lines.
CONFLICT_RE = re.compile(r"^=== conflicted file: (\S+) ===\n(.*?)^=== end ===$", re.M | re.S)
_MARKER_RE = re.compile(r"^(?:<{7}|={7}|>{7})(?: .*)?\n?", re.M)


def _resolve(cfg: SimConfig, t: Turn, conflicts: list[tuple[str, str]]) -> Reply:
    """Resolve conflicts by keeping both sides, one file per step, then finish."""
    if t.step < len(conflicts) and "write_file" in t.tools:
        path, body = conflicts[t.step]
        schema = t.tools["write_file"]
        args = {_prop(schema, ("path", "file_path", "filename", "file")): path,
                _prop(schema, ("content", "text", "data")): _MARKER_RE.sub("", body)}
        return Reply(f"{LABEL} resolving {path}", [(_call_id(cfg, t), "write_file",
                                                     json.dumps(args))])
    summary = f"{LABEL} resolved {len(conflicts)} conflicted file(s) by keeping both sides"
    return Reply(summary, [(_call_id(cfg, t), "finish", json.dumps({"summary": summary}))])


_CONTEXT_RE = re.compile(r"\n\s*(?:\(Part of:|Result of |Overall goal)")


def own_text(task: str) -> str:
    """The node's own task, without the goal and inputs quoted after it as context: a
    directive in the goal must script only the node it was written for."""
    m = _CONTEXT_RE.search(task)
    return task[: m.start()] if m else task


def _act(cfg: SimConfig, t: Turn) -> Reply:
    i = t.step
    instructions = _find(t.messages, "user", last=False)
    if conflicts := CONFLICT_RE.findall(instructions):  # quoted files may hold anything
        return _resolve(cfg, t, conflicts)
    own = own_text(instructions)
    if FAIL_DIRECTIVE in own:
        return Reply("")  # neither a tool call nor an answer: the agent gives up
    if REPEAT_DIRECTIVE in own and "shell" in t.tools:  # the same call forever: a loop
        return Reply(f"{LABEL} again", [(_call_id(cfg, t), "shell",
                                         json.dumps({"command": "ls -la"}))])
    shared = _WRITE_RE.search(own)
    digest = f"{stable_hash(cfg.seed, t.run, t.node, i, instructions):016x}"
    prefer, other = ("write_file", "shell") if i % 2 == 0 else ("shell", "write_file")
    # list_files is the fallback: benchmarks offer only it, to time steps without tool cost
    name = next((n for n in (prefer, other, "list_files") if n in t.tools), "finish")
    if i >= cfg.tool_steps:
        name = "finish"
    args: dict[str, Any]
    if name == "write_file":
        schema = t.tools[name]
        path = shared.group(1) if shared and i == 0 else f"notes/{t.node}-{i}.md"
        args = {_prop(schema, ("path", "file_path", "filename", "file")): path,
                _prop(schema, ("content", "text", "data")):
                    f"# {LABEL} notes of {t.node}, step {i}\n\nrun {t.run}, seed {cfg.seed}, "
                    f"digest {digest}\n\n{instructions[:400]}\n"}
    elif name == "list_files":
        args = {"path": "."}
    elif name == "shell":
        command = "wc -c notes/*" if i % 4 == 1 else "ls -la"
        args = {_prop(t.tools[name], ("command", "cmd")): command}
    else:
        args = {"summary": f"{LABEL} {t.node} finished after {i} steps: "
                           f"{_excerpt(instructions)} ({digest[:8]})",
                "data": {"run": t.run, "node": t.node, "steps": i, "digest": digest}}
    return Reply(f"{LABEL} step {i}: {name}", [(_call_id(cfg, t), name, json.dumps(args))])


def _corrupt(cfg: SimConfig, t: Turn, reply: Reply) -> tuple[Reply, str | None]:
    """Inject a malformed or unknown tool call, unless this turn repairs an earlier error."""
    last = t.messages[-1] if t.messages else {}
    repairing = last.get("role") == "tool" and _ERROR_RE.search(_text(last.get("content")))
    if not reply.calls or repairing or not _faulty(cfg, t):
        return reply, None
    u = _unit(cfg.seed, t.run, t.node, t.step, t.attempt, "content")
    cid, name, args = reply.calls[0]
    if u < cfg.rate_malformed:  # any proper prefix of a JSON object is invalid JSON
        return replace(reply, calls=[(cid, name, args[: len(args) // 2])]), "malformed"
    if u < cfg.rate_malformed + cfg.rate_unknown_tool:
        bogus = next(n for n in ("teleport", "teleport_2", "teleport_3") if n not in t.tools)
        return replace(reply, calls=[(cid, bogus, args)]), "unknown_tool"
    return reply, None


# ---- synthesis -----------------------------------------------------------------------------

_HEADING_RE = re.compile(r"^(#{1,6})[ \t]+(.+?)\s*$", re.M)
_RULE_RE = re.compile(r"^[ \t]*(?:-{3,}|={3,})[ \t]*$", re.M)


def split_inputs(text: str) -> list[tuple[str, str]]:
    """The inputs a merge prompt lists: markdown sections, else `---` blocks, else paragraphs."""
    heads = list(_HEADING_RE.finditer(text))
    levels = sorted({len(h.group(1)) for h in heads})
    # The shallowest level that repeats separates inputs; deeper ones are inside an input.
    level = next((lv for lv in levels if sum(len(h.group(1)) == lv for h in heads) >= 2), None)
    if level is not None:
        heads = [h for h in heads if len(h.group(1)) == level]
        ends = [h.start() for h in heads[1:]] + [len(text)]
        return [(h.group(2), text[h.end():end].strip()) for h, end in zip(heads, ends, strict=True)]
    chunks = _RULE_RE.split(text) if _RULE_RE.search(text) else re.split(r"\n\s*\n", text)
    chunks = [c.strip() for c in chunks if c.strip()]
    return [(f"input {i}", c) for i, c in enumerate(chunks, 1)] or [("input 1", "")]


# Compaction: the agent asks for a summary of its older steps, then shows it in place of
# them. The summary names how many steps it covers, so the step index (and with it every
# decision) stays the same after compaction.
_SUMMARISE_MARK = "Summarise these agent steps"
_COVERS_RE = re.compile(r"summary of (\d+) earlier steps")


def compacted_steps(messages: list[dict[str, Any]]) -> int:
    for m in messages:
        text = _text(m.get("content"))
        if m.get("role") == "user" and text.startswith("Summary of your earlier steps"):
            found = _COVERS_RE.search(text)
            return int(found.group(1)) if found else 0
    return 0


def _summarise(request: str) -> Reply:
    calls = sum(1 for line in request.splitlines() if line.startswith("call "))
    earlier = sum(int(m) for m in _COVERS_RE.findall(request))
    return Reply(f"{LABEL} summary of {calls + earlier} earlier steps")


def _synthesize(cfg: SimConfig, t: Turn) -> Reply:
    if _find(t.messages, "system", last=False).startswith(_SUMMARISE_MARK):
        return _summarise(_find(t.messages, "user", last=True))
    inputs = split_inputs(_find(t.messages, "user", last=True))
    shown = [f"{title}: {_excerpt(text)} #{stable_hash(text) % 16**6:06x}"
             for title, text in inputs[:40]]
    more = f"; and {len(inputs) - 40} more" if len(inputs) > 40 else ""
    whole = stable_hash(cfg.seed, *(text for _, text in inputs))
    return Reply(f"{LABEL} Synthesis of {len(inputs)} inputs: "
                 + "; ".join(shown) + more + f" (digest {whole:016x})")
