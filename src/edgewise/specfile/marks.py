"""Load YAML and remember the line of every value, so errors can point at it.

Documents come from operators and, through the control plane, from anyone holding an operator
token, so their shape is bounded before anything is built: at most `MAX_DEPTH` levels of nesting
and `MAX_NODES` values once aliases are expanded (a 250-byte "billion laughs" document of nested
aliases would otherwise expand to millions of paths). The check walks PyYAML's event stream,
which is iterative, so it costs time linear in the text and no recursion.
"""

from __future__ import annotations

from typing import Any

import yaml

Path = tuple[str | int, ...]

MAX_DEPTH = 64  # levels of nested mappings and sequences
MAX_NODES = 100_000  # values in the document with every alias expanded


def load_with_lines(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse ``text``; return the data and a map from key path to 1-based line number.

    Raises `yaml.YAMLError` on bad YAML (callers turn it into a `SpecError`), including a key
    given twice in one mapping, which YAML loaders otherwise resolve silently to the last one.
    """
    check_shape(text)
    loader = yaml.SafeLoader(text)  # what yaml.compose, then yaml.safe_load do, parsing once
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[Path, int] = {}
        _walk(node, (), lines)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


def check_shape(text: str) -> None:
    """Refuse a document nested deeper than `MAX_DEPTH` or larger than `MAX_NODES` values with its
    aliases expanded. Raises `yaml.MarkedYAMLError` pointing at the place it gave up."""
    sizes: dict[str, int] = {}  # anchor -> values in the anchored node, aliases expanded
    stack: list[tuple[str | None, int]] = []  # open collections: (anchor, expanded so far)
    expanded = 0

    def add(n: int, event: yaml.Event) -> None:
        nonlocal expanded
        expanded += n
        if stack:
            anchor, count = stack[-1]
            stack[-1] = (anchor, count + n)
        if expanded > MAX_NODES:
            raise yaml.MarkedYAMLError(
                problem=f"the document expands to more than {MAX_NODES:,} values (aliases "
                        "included); write it out plainly or split it",
                problem_mark=event.start_mark)

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise yaml.MarkedYAMLError(
                    problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=event.start_mark)
            add(1, event)
            stack.append((event.anchor, 1))
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, count = stack.pop()
            if anchor is not None:
                sizes[anchor] = count
            if stack:
                parent, total = stack[-1]
                stack[-1] = (parent, total + count - 1)  # its first value was counted at start
        elif isinstance(event, yaml.ScalarEvent):
            add(1, event)
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            add(sizes.get(event.anchor, 1), event)


def _walk(node: yaml.Node, path: Path, lines: dict[Path, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            k = key.value
            if isinstance(key, yaml.ScalarNode):
                if k in seen:
                    raise yaml.MarkedYAMLError(
                        problem=f"duplicate key {k!r} (first at line {seen[k]}); keep one",
                        problem_mark=key.start_mark,
                    )
                seen[k] = key.start_mark.line + 1
            lines[(*path, k)] = key.start_mark.line + 1
            _walk(value, (*path, k), lines)
            lines[(*path, k)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines)


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of ``path`` or of its nearest ancestor that has one."""
    p = tuple(path)
    while p:
        if p in lines:
            return lines[p]
        p = p[:-1]
    return lines.get(())
