"""How much prose the example architecture documents share (issue 14: at most 30%).

    python benchmarks/plan_similarity.py [WORKLOAD.yaml ...]

Plans every workload (default: examples/workloads/*.yaml) with the static CPU table (the prose
does not depend on calibration), builds its document, masks every number and compares the
prose sentences (paragraphs and list items) of every pair: shared = sentences in common / the
smaller document's sentences (`edgewise.plan.similarity`). Prints one line per pair, the
largest share, the word counts, and the same as JSON on the last line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgewise.plan import document, similarity
from edgewise.plan.model import build_plan
from edgewise.plan.workload import load_workload

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 0.30


def documents(paths: list[Path], names: bool = False
              ) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Masked prose sentences and word counts per workload; ``names``: mask the workload's
    own names too (the stricter measure)."""
    docs: dict[str, set[str]] = {}
    words: dict[str, int] = {}
    for path in paths:
        plan = build_plan(load_workload(path))
        doc, n, _warnings = document.build_within(plan)
        masked = similarity.names_of(plan) if names else ()
        docs[path.stem] = similarity.prose_sentences(doc, masked)
        words[path.stem] = n
    return docs, words


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((ROOT / "examples" / "workloads").glob("*.yaml"))
    docs, words = documents(paths)
    strict, _ = documents(paths, names=True)
    rows = similarity.pairs(docs)
    srows = {(x, y): (s, c) for x, y, s, c in similarity.pairs(strict)}
    print(f"{'pair':>47}  numbers masked | numbers and names masked")
    for x, y, share, common in rows:
        s2, c2 = srows[(x, y)]
        print(f"{x:>22} / {y:<22} {share:6.1%} ({common:>2} of "
              f"{min(len(docs[x]), len(docs[y]))}) | {s2:6.1%} ({c2:>2} of "
              f"{min(len(strict[x]), len(strict[y]))})")
    worst = max((r[2] for r in rows), default=0.0)
    worst_strict = max((v[0] for v in srows.values()), default=0.0)
    print(f"largest share {worst:.1%} with numbers masked (limit {LIMIT:.0%}), "
          f"{worst_strict:.1%} with names masked too; words: "
          + ", ".join(f"{k} {v:,}" for k, v in words.items()))
    print(json.dumps({"pairs": [{"a": x, "b": y, "shared": round(s, 4), "common": c,
                                 "shared_names_masked": round(srows[(x, y)][0], 4)}
                                for x, y, s, c in rows],
                      "largest": round(worst, 4), "largest_names_masked": round(worst_strict, 4),
                      "words": words}))
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
