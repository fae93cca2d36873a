"""The document's building blocks (headings, paragraphs, bullet lists, tables, images) and
their two renderings: `to_markdown` and `to_html` render the same blocks, so the two versions of
the architecture document never disagree. `word_count` counts the words of the Markdown.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass


@dataclass
class H:
    level: int
    text: str


@dataclass
class P:
    text: str


@dataclass
class UL:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Img:
    src: str
    alt: str


Block = H | P | UL | Table | Img


# -- rendering -----------------------------------------------------------------------------------

def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for blk in blocks:
        if isinstance(blk, H):
            out.append(f"{'#' * blk.level} {blk.text}\n")
        elif isinstance(blk, P):
            out.append(blk.text + "\n")
        elif isinstance(blk, UL):
            out.append("\n".join(f"- {i}" for i in blk.items) + "\n")
        elif isinstance(blk, Table):
            lines = ["| " + " | ".join(_cell(c) for c in blk.header) + " |",
                     "|" + "|".join("---" for _ in blk.header) + "|"]
            lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in blk.rows]
            out.append("\n".join(lines) + "\n")
        elif isinstance(blk, Img):
            out.append(f"![{blk.alt}]({blk.src})\n")
    return "\n".join(out)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)


def to_html(blocks: list[Block], title: str) -> str:
    body: list[str] = []
    for blk in blocks:
        if isinstance(blk, H):
            body.append(f"<h{blk.level}>{_inline(blk.text)}</h{blk.level}>")
        elif isinstance(blk, P):
            body.append(f"<p>{_inline(blk.text)}</p>")
        elif isinstance(blk, UL):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in blk.items) + "</ul>")
        elif isinstance(blk, Table):
            head = "".join(f"<th>{_inline(c)}</th>" for c in blk.header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>"
                           for r in blk.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(blk, Img):
            body.append(f'<figure><img src="{html.escape(blk.src)}" alt="{html.escape(blk.alt)}">'
                        f"<figcaption>{html.escape(blk.alt)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
             "padding:.25em .5em;font-size:.9em;text-align:left}img{max-width:100%}"
             "code{background:#f3f3f3;padding:0 .2em}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def word_count(markdown: str) -> int:
    """Words of the document: tokens with a letter or digit, image lines excluded."""
    text = "\n".join(line for line in markdown.splitlines() if not line.startswith("!["))
    text = re.sub(r"^\|?-{3}.*$", "", text, flags=re.M)
    return len(re.findall(r"[A-Za-z0-9$][^\s|]*", text))
