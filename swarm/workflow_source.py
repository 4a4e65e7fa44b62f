"""A workflow file's YAML kept beside its data, so that any error location (a pydantic loc,
a key, a dependency) maps back to `file:line:col` for a one-line, fixable message."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from swarm.errors import NotFound, UserError

_MERGE_TAG = "tag:yaml.org,2002:merge"
_NULL_TAG = "tag:yaml.org,2002:null"

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


# ---- the file: YAML nodes kept beside the data, so any location maps back to a line -----


@dataclass
class Source:
    file: str
    text: str
    data: Any = None
    values: dict[Loc, yaml.Node] = field(default_factory=dict)
    keys: dict[Loc, yaml.Node] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Source:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFound(f"{path}: no such workflow file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read workflow file: {exc}") from None
        src = cls(file=str(path), text=text)
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            if root is None:
                raise UserError(f"{path}:1:1: workflow file is empty")
            src.data = src._convert(root, ())
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            context = f" ({exc.context})" if exc.context and exc.problem else ""
            raise UserError(
                f"{where}: YAML syntax error: {exc.problem or exc.context}{context}"
            ) from None
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: YAML error: {exc}") from None
        return src

    def _convert(self, node: yaml.Node, loc: Loc) -> Any:
        # Scalars stay the text written (so `3.10` stays "3.10"); pydantic coerces where a
        # field wants a number or a boolean.
        self.values[loc] = node
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc)
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(n, (*loc, i)) for i, n in enumerate(node.value)]
        return None if node.tag == _NULL_TAG else node.value

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        first: dict[str, yaml.Node] = {}
        for k, _ in node.value:
            if k.tag == _MERGE_TAG:
                continue
            name = self._key(k)
            if name in first:
                self.fail_at(k, f"duplicate key {name!r} (first at line {_line(first[name])})")
            first[name] = k
        yaml.constructor.SafeConstructor().flatten_mapping(node)  # `<<: *anchor` merge keys
        out: dict[str, Any] = {}
        for k, v in node.value:
            name = self._key(k)
            self.keys[(*loc, name)] = k
            out[name] = self._convert(v, (*loc, name))
        return out

    def _key(self, node: yaml.Node) -> str:
        if not isinstance(node, yaml.ScalarNode):
            self.fail_at(node, "mapping keys must be plain strings")
        return str(node.value)

    def fail_at(self, node: yaml.Node, msg: str, cls: type[UserError] = UserError) -> NoReturn:
        m = node.start_mark
        raise cls(f"{self.file}:{m.line + 1}:{m.column + 1}: {msg}")

    def fail(self, loc: Loc, msg: str, *, key: bool = False, offset: int | None = None,
             cls: type[UserError] = UserError) -> NoReturn:
        """Raise `cls` located at `loc` (its key with key=True, a char of a scalar with offset)."""
        found = self.resolve(loc)
        node = self.values[found]
        exact = found == tuple(loc)
        if key and exact and found in self.keys:
            node = self.keys[found]
        line, col = node.start_mark.line, node.start_mark.column
        if offset is not None and exact and isinstance(node, yaml.ScalarNode):
            line, col = self._scalar_pos(node, offset)
        raise cls(f"{self.file}:{line + 1}:{col + 1}: {msg}")

    def resolve(self, loc: Loc) -> Loc:
        """The longest part of `loc` that has a YAML node (skips pydantic's union tags)."""
        found: Loc = ()
        for part in loc:
            if (*found, part) in self.values:
                found = (*found, part)
        return found

    def _scalar_pos(self, node: yaml.ScalarNode, offset: int) -> tuple[int, int]:
        """Line and column of character `offset` of a scalar's value, where that is exact."""
        start, end, value = node.start_mark, node.end_mark, str(node.value)
        if node.style is None and start.line == end.line:
            return start.line, start.column + offset
        raw = self.text[start.index + 1 : end.index - 1]
        if node.style in ("'", '"') and start.line == end.line and raw == value:
            return start.line, start.column + 1 + offset
        if node.style == "|":  # literal block: value line k is source line start.line + 1 + k
            head = value.rfind("\n", 0, offset) + 1
            line = start.line + 1 + value.count("\n", 0, offset)
            in_value = value[head:].split("\n", 1)[0]
            lines = self.text.split("\n")
            if line < len(lines) and lines[line].rstrip("\r").endswith(in_value):
                return line, len(lines[line].rstrip("\r")) - len(in_value) + offset - head
        return start.line, start.column

    def line_of(self, loc: Loc) -> int:
        node = self.keys.get(loc) or self.values.get(loc)
        return _line(node) if node is not None else 0

    def validate(
        self, model: type[M], data: Any, loc: Loc, *, label: str = "", extra: Iterable[str] = ()
    ) -> M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = self.resolve((*loc, *err["loc"]))[len(loc) :]
            msg, key = _describe(model, err, tuple(extra), _dotted(where))
            self.fail((*loc, *err["loc"]), label + msg, key=key)


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _dotted(loc: Loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


_PLAIN_TYPES = {"dict_type": "a mapping", "model_type": "a mapping", "list_type": "a list",
                "string_type": "a string"}


def _describe(
    model: type[BaseModel], err: Any, extra: tuple[str, ...], where: str
) -> tuple[str, bool]:
    """One readable line for a pydantic error, and whether it points at a key."""
    loc, kind = tuple(err["loc"]), err["type"]
    name = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        inner = _model_at(model, loc[:-1])
        known = [*(inner.model_fields if inner else ()), *(extra if len(loc) == 1 else ())]
        return f"unknown field {name!r}{suggest(name, known)}", True
    if kind == "missing":
        return f"missing field {name!r}", False
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        got = str(err["input"])
        hint = suggest(got, choices)
        return f"unknown {name} {got!r}{hint}; expected one of: {', '.join(choices)}", False
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind in _PLAIN_TYPES:
        msg = f"expected {_PLAIN_TYPES[kind]}"
    return (f"{where}: {msg}" if where else msg), False


def _model_at(model: type[BaseModel] | None, loc: Loc) -> type[BaseModel] | None:
    """The model that validates the mapping at `loc` (None inside a plain dict or list)."""
    for part in loc:
        info = model.model_fields.get(part) if model and isinstance(part, str) else None
        if info is not None:
            model = _inner_model(info.annotation)
    return model


def _inner_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return next((m for m in map(_inner_model, get_args(ann)) if m is not None), None)


def suggest(word: str, choices: Iterable[str], fmt: str = "{!r}") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


# ---- params and `{name}` substitution ---------------------------------------------------
