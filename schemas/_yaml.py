"""Safe YAML with positions: plain data, plus the line and column of every key path.

Built on ``yaml.SafeLoader`` (nothing but plain data is ever constructed). On top of it:

* duplicate keys and non-string keys are problems (PyYAML silently keeps the last one);
* merge keys (``<<: *base``) and anchors work; keys a mapping merges in may be overridden;
* timestamps stay text (``2024-01-01`` is not turned into a date);
* the YAML 1.1 readings users trip over are recorded per key path as :class:`Surprise`
  values: a leading-zero integer (``port: 05432`` is octal, 2842), a base-60 number
  (``1:30`` is 90), and ``yes``/``no``/``on``/``off`` read as booleans;
* where each scalar value starts, and whether a character offset in it maps one to one onto
  the source line (a one-line plain or quoted scalar without escapes);
* syntax errors carry hints: a tab (use spaces), an unterminated quote (the line where it
  opened);
* a value PyYAML cannot construct, a recursive alias, a document nested too deep or one whose
  aliases expand into too many values is a problem, never a crash.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.error import Mark, MarkedYAMLError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

__all__ = ["Path", "Surprise", "ValuePosition", "YamlProblem", "YamlDocument", "parse_yaml"]

logger = logging.getLogger("pgregistry.schemas")

Path = tuple[str | int, ...]

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_VALUES = 100_000  # after alias expansion
_BOOL_WORDS = frozenset({"yes", "no", "on", "off"})  # booleans in YAML 1.1 only
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9_]+$")
_BASE_60 = re.compile(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$")


@dataclass(frozen=True)
class Surprise:
    """A scalar YAML 1.1 reads unlike most people (and YAML 1.2) would: ``kind`` is
    ``"octal"``, ``"base60"`` or ``"bool"``; ``raw`` the text as written; ``value`` what
    PyYAML made of it."""

    kind: str
    raw: str
    value: Any


@dataclass(frozen=True)
class ValuePosition:
    """Where a scalar value's text starts (1-based line and column, after any opening quote),
    and whether character ``i`` of the value sits at column ``column + i`` of that line."""

    line: int
    column: int
    exact: bool

    def at(self, offset: int | None) -> tuple[int, int]:
        """Line and column of character ``offset`` of the value (its start when unknown)."""
        if offset is None or not self.exact:
            return self.line, self.column
        return self.line, self.column + offset


@dataclass(frozen=True)
class YamlProblem:
    """A problem found while reading YAML; ``path`` is ``None`` when not known."""

    path: Path | None
    line: int | None
    column: int | None
    message: str
    value_dropped: bool = False  # the value at ``path`` was replaced by null


@dataclass
class YamlDocument:
    """Plain data (dicts, lists, scalars), where each key path is, and what went wrong."""

    data: Any
    positions: dict[Path, tuple[int, int]] = field(default_factory=dict)
    problems: list[YamlProblem] = field(default_factory=list)
    value_positions: dict[Path, ValuePosition] = field(default_factory=dict)
    surprises: dict[Path, Surprise] = field(default_factory=dict)


class _Map(dict[str, Any]):
    """A constructed mapping that remembers where it and its keys are."""

    def __init__(self, mark: Mark | None) -> None:
        super().__init__()
        self.mark = mark
        self.key_marks: dict[str, Mark | None] = {}
        self.value_positions: dict[str, ValuePosition] = {}
        self.issues: list[tuple[Mark | None, str, str | None]] = []  # (where, message, key)


class _Seq(list[Any]):
    """A constructed sequence that remembers where it and its items are."""

    def __init__(self, mark: Mark | None) -> None:
        super().__init__()
        self.mark = mark
        self.item_marks: list[Mark | None] = []


def _where(mark: Mark | None) -> tuple[int | None, int | None]:
    if mark is None:
        return None, None
    return mark.line + 1, mark.column + 1


def _describe_key(node: Node) -> str:
    if isinstance(node, ScalarNode):
        kind = node.tag.rsplit(":", 1)[-1]
        text = node.value if len(node.value) <= 40 else node.value[:37] + "..."
        return f"{text!r} (a YAML {kind})"
    return "a mapping" if isinstance(node, MappingNode) else "a list"


class _Loader(yaml.SafeLoader):
    """SafeLoader that records key positions and refuses duplicate and non-string keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.map_issues: dict[int, list[tuple[Mark | None, str, str | None]]] = {}

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:  # type: ignore[override]
        # Checked on the node as written, before any merge key is flattened into it.
        # (types-PyYAML declares ``anchor`` wrongly; PyYAML passes the anchor name.)
        node = super().compose_mapping_node(anchor)  # type: ignore[arg-type]
        issues: list[tuple[Mark | None, str, str | None]] = []
        seen: dict[str, Mark | None] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR_TAG:
                issues.append((key_node.start_mark,
                               f"keys must be strings, got {_describe_key(key_node)}", None))
                continue
            if key_node.value in seen:
                first, _ = _where(seen[key_node.value])
                issues.append((key_node.start_mark,
                               f"duplicate key {key_node.value!r} (first at line {first})",
                               key_node.value))
            else:
                seen[key_node.value] = key_node.start_mark
        if issues:
            self.map_issues[id(node)] = issues
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception:  # PyYAML's constructors raise ValueError/TypeError on odd scalars
            kind = node.tag.rsplit(":", 1)[-1]
            raise ConstructorError(None, None, f"cannot read this value as a YAML {kind}",
                                   node.start_mark) from None

    def fill_map(self, data: _Map, node: MappingNode) -> None:
        data.issues = self.map_issues.get(id(node), [])
        self.flatten_mapping(node)
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue
            data[key] = self.construct_object(value_node, deep=False)
            data.key_marks[key] = key_node.start_mark
            position = _value_position(value_node)
            if position is not None:
                data.value_positions[key] = position


def _construct_map(loader: _Loader, node: MappingNode) -> Iterator[_Map]:
    data = _Map(node.start_mark)
    yield data
    loader.fill_map(data, node)


def _construct_seq(loader: _Loader, node: SequenceNode) -> Iterator[_Seq]:
    data = _Seq(node.start_mark)
    yield data
    for item in node.value:
        data.append(loader.construct_object(item, deep=False))
        data.item_marks.append(item.start_mark)


def _construct_timestamp(loader: _Loader, node: ScalarNode) -> str:
    return str(loader.construct_scalar(node))


def _construct_int(loader: _Loader, node: ScalarNode) -> Any:
    value = yaml.SafeLoader.construct_yaml_int(loader, node)
    text = node.value
    if _LEADING_ZERO.match(text) and text.lstrip("+-").replace("_", "") != "0" * len(
            text.lstrip("+-").replace("_", "")):
        return Surprise("octal", text, value)
    if ":" in text and _BASE_60.match(text):
        return Surprise("base60", text, value)
    return value


def _construct_float(loader: _Loader, node: ScalarNode) -> Any:
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    if ":" in node.value and _BASE_60.match(node.value):
        return Surprise("base60", node.value, value)
    return value


def _construct_bool(loader: _Loader, node: ScalarNode) -> Any:
    value = yaml.SafeLoader.construct_yaml_bool(loader, node)
    if node.value.lower() in _BOOL_WORDS:
        return Surprise("bool", node.value, value)
    return value


def _value_position(node: Node) -> ValuePosition | None:
    if not isinstance(node, ScalarNode) or node.start_mark is None:
        return None
    start, end = node.start_mark, node.end_mark
    quoted = node.style in ("'", '"')
    exact = False
    buffer = getattr(start, "buffer", None)
    if end is not None and start.line == end.line and node.style in (None, "'", '"') \
            and isinstance(buffer, str):
        raw = buffer[start.pointer + (1 if quoted else 0):end.pointer - (1 if quoted else 0)]
        exact = raw == node.value
    return ValuePosition(start.line + 1, start.column + 1 + (1 if quoted else 0), exact)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _construct_timestamp)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


class _TooBig(Exception):
    pass


class _Flattener:
    """Turns constructed data into plain dicts and lists, recording positions."""

    def __init__(self, doc: YamlDocument) -> None:
        self.doc = doc
        self.count = 0
        self.active: set[int] = set()

    def plain(self, value: Any, path: Path) -> Any:
        self.count += 1
        if self.count > _MAX_VALUES:
            raise _TooBig
        if isinstance(value, Surprise):
            self.doc.surprises[path] = value
            return value.value
        if isinstance(value, (_Map, _Seq)):
            if id(value) in self.active:
                line, column = _where(value.mark)
                self.doc.problems.append(YamlProblem(
                    path, line, column, "an alias refers to a mapping or list that contains it",
                    value_dropped=True))
                return None
            self.active.add(id(value))
            try:
                return self._container(value, path)
            finally:
                self.active.discard(id(value))
        return value

    def _container(self, value: _Map | _Seq, path: Path) -> Any:
        if isinstance(value, _Map):
            for mark, message, key in value.issues:
                line, column = _where(mark)
                where = path if key is None else (*path, key)
                self.doc.problems.append(YamlProblem(where, line, column, message))
            out: dict[str, Any] = {}
            for key, item in value.items():
                child = (*path, key)
                mark = value.key_marks.get(key)
                if mark is not None:
                    self.doc.positions.setdefault(child, (mark.line + 1, mark.column + 1))
                if key in value.value_positions:
                    self.doc.value_positions.setdefault(child, value.value_positions[key])
                out[key] = self.plain(item, child)
            return out
        items: list[Any] = []
        for index, item in enumerate(value):
            child = (*path, index)
            mark = value.item_marks[index] if index < len(value.item_marks) else None
            if mark is not None:
                self.doc.positions.setdefault(child, (mark.line + 1, mark.column + 1))
            items.append(self.plain(item, child))
        return items


def _yaml_error_problem(exc: yaml.YAMLError, text: str) -> YamlProblem:
    if isinstance(exc, MarkedYAMLError):
        if (exc.context or "").startswith("while scanning a quoted scalar") and \
                exc.context_mark is not None:
            line, column = _where(exc.context_mark)
            return YamlProblem(None, line, column,
                               f"invalid YAML: unterminated quoted string: the quote opened at "
                               f"line {line}, column {column} is never closed")
        mark = exc.problem_mark or exc.context_mark
        line, column = _where(mark)
        parts = [part for part in (exc.context, exc.problem) if part]
        message = ", ".join(parts) or "invalid YAML"
        lines = text.splitlines()
        if line is not None and 0 < line <= len(lines) and "\t" in lines[line - 1] or \
                "'\\t'" in (exc.problem or ""):
            message += " (a tab: YAML does not allow tabs for indentation, use spaces)"
        return YamlProblem(None, line, column, f"invalid YAML: {message}")
    if isinstance(exc, ReaderError):  # a character YAML does not allow
        before = text[:exc.position]
        line = before.count("\n") + 1
        column = exc.position - (before.rfind("\n") + 1) + 1
        return YamlProblem(None, line, column, f"invalid YAML: character #x{exc.character:04x} "
                                               f"is not allowed ({exc.reason})")
    return YamlProblem(None, None, None, "invalid YAML")


def parse_yaml(text: str) -> YamlDocument:
    """Parse one YAML document safely. Never raises: every failure is a problem in the
    returned document (whose ``data`` is then ``None``)."""
    doc = YamlDocument(data=None)
    try:
        loader = _Loader(text)  # checks the characters already
        try:
            constructed = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        doc.problems.append(_yaml_error_problem(exc, text))
        return doc
    except RecursionError:
        doc.problems.append(YamlProblem(None, None, None, "invalid YAML: nested too deeply"))
        return doc
    except Exception:  # a PyYAML bug on strange input must not escape as anything else
        logger.debug("yaml: unexpected failure", exc_info=True)
        doc.problems.append(YamlProblem(None, None, None, "invalid YAML: cannot be parsed"))
        return doc
    if isinstance(constructed, (_Map, _Seq)) and constructed.mark is not None:
        doc.positions[()] = (constructed.mark.line + 1, constructed.mark.column + 1)
    flattener = _Flattener(doc)
    try:
        doc.data = flattener.plain(constructed, ())
    except (_TooBig, RecursionError):
        doc.problems.append(YamlProblem(
            None, None, None,
            f"the document is too large or nested too deeply (more than {_MAX_VALUES} "
            "values once aliases are expanded)"))
        doc.data = None
    # Key problems of mappings the data does not reach (a duplicate key's first value),
    # without a key path.
    seen = {(p.line, p.column, p.message) for p in doc.problems}
    for issues in loader.map_issues.values():
        for mark, message, _ in issues:
            line, column = _where(mark)
            if (line, column, message) not in seen:
                seen.add((line, column, message))
                doc.problems.append(YamlProblem(None, line, column, message))
    return doc
