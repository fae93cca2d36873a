"""How much prose two architecture documents share: the measure of boilerplate.

`prose_sentences` takes the sentences of a document's paragraphs and list items (headings,
tables and images are not prose), with every number masked (``#``), so two documents that
differ only in their figures count as the same. `shared` is the share of the sentences of the
smaller document that also occur in the other one (after masking, as sets), the stricter of the
two directions. Masking numbers only (the measure of issue 14) counts a sentence that differs
only by the names of the workload's sites, sources or stages as different; `names_of` gives
those names so that a stricter measure can mask them too (``@``).
``benchmarks/plan_similarity.py`` prints both for every pair of examples.
"""

from __future__ import annotations

import re
from itertools import combinations
from typing import Any

from edgewise.plan.blocks import UL, Block, P

_NUMBER = re.compile(r"\d[\d,.]*(\s*(%|x\b))?")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z*`(])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SPLIT.split(text) if s.strip()]


def mask(sentence: str, names: tuple[str, ...] = ()) -> str:
    """The sentence with numbers masked as ``#`` and, if given, the workload's own names
    (workload, site types, sources, stages, streams, node models) as ``@``."""
    for name in sorted(names, key=len, reverse=True):
        sentence = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", "@", sentence)
    return re.sub(r"\s+", " ", _NUMBER.sub("#", sentence)).strip().rstrip(".")


def names_of(plan: Any) -> tuple[str, ...]:
    """The identifiers a plan's document names: the workload, its site types, sources,
    stages, streams and node models."""
    out = {plan.workload.name}
    for sp in plan.sites:
        out.add(sp.name)
        out.update(s.id for s in sp.site.sources)
        out.update(st.id for st in sp.stages)
        out.update(s.name for s in sp.streams)
        out.add(sp.final.sizing.option.name)
    return tuple(sorted(out))


def raw_sentences(blocks: list[Block]) -> list[str]:
    """The sentences of the document's paragraphs and list items, unmasked."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, P):
            out.extend(split_sentences(b.text))
        elif isinstance(b, UL):
            for item in b.items:
                out.extend(split_sentences(item))
    return out


def prose_sentences(blocks: list[Block], names: tuple[str, ...] = ()) -> set[str]:
    return {mask(s, names) for s in raw_sentences(blocks)}


def shared(a: set[str], b: set[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / min(len(a), len(b))


def pairs(docs: dict[str, set[str]]) -> list[tuple[str, str, float, int]]:
    """Every pair of documents: names, shared share, sentences in common."""
    return [(x, y, shared(docs[x], docs[y]), len(docs[x] & docs[y]))
            for x, y in combinations(sorted(docs), 2)]
