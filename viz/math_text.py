"""User and model text for Streamlit markdown: inert everywhere except its LaTeX, which renders as
math (Streamlit's markdown draws `$...$` with KaTeX).

Reasoning traces write math as `\\( ... \\)`, `\\[ ... \\]`, `$ ... $`, `$$ ... $$` and bare
`\\boxed{...}`. Everything outside those is escaped (HTML characters as entities, Markdown
characters with a backslash), so no user text is ever read as HTML or markup. Inside math, `<`
and `>` become `\\lt` and `\\gt`: no angle bracket reaches the markdown at all.
"""

from __future__ import annotations

import re

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~$])")
# A math opener: \( \[ $$ $ or \boxed{ (the last is closed by its balancing brace).
_OPENER = re.compile(r"\\\(|\\\[|\$\$|\$|\\boxed\{")
_CLOSER = {"\\(": "\\)", "\\[": "\\]", "$$": "$$"}


def inert(text: str) -> str:
    """Text shown exactly as typed inside markdown: no markup, no HTML, no math."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _math(source: str) -> str:
    source = " ".join(source.replace("$", "\\$").split())
    return "$" + source.replace("<", "\\lt ").replace(">", "\\gt ").strip() + "$"


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the brace that closes the one opened before `start`, or None."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return None


def _single_dollar_end(text: str, start: int) -> int | None:
    """End of `$...$` opened before `start`, by pandoc's rule (so "$1 and $2" stays text): the
    opener is followed by a non-space, the closer preceded by a non-space and not followed by
    a digit."""
    if start >= len(text) or text[start].isspace():
        return None
    for i in range(start + 1, len(text)):
        if text[i] == "$" and text[i - 1] != "\\" and not text[i - 1].isspace() \
                and not (i + 1 < len(text) and text[i + 1].isdigit()):
            return i + 1
        if text[i] == "\n" and text[i - 1] == "\n":  # math never spans a paragraph break
            return None
    return None


def _math_end(text: str, opener: str, start: int) -> int | None:
    if opener == "\\boxed{":
        return _balanced_end(text, start)
    if opener == "$":
        return _single_dollar_end(text, start)
    end = text.find(_CLOSER[opener], start)
    return None if end < 0 else end + len(_CLOSER[opener])


def math_markdown(text: str) -> str:
    """`text` as one line of markdown: LaTeX as `$...$`, the rest inert, whitespace collapsed."""
    out, pos = [], 0
    while (match := _OPENER.search(text, pos)) is not None:
        opener = match.group()
        escaped = opener.startswith("$") and text[match.start() - 1:match.start()] == "\\"
        end = None if escaped else _math_end(text, opener, match.end())
        if end is None:  # unclosed: the opener is plain text
            out.append(inert(text[pos:match.end()]))
            pos = match.end()
            continue
        out.append(inert(text[pos:match.start()]))
        body = (text[match.start():end] if opener == "\\boxed{"
                else text[match.end():end - len(_CLOSER.get(opener, "$"))])
        out.append(_math(body) if body.strip() else "")
        pos = end
    out.append(inert(text[pos:]))
    return " ".join("".join(out).split())
