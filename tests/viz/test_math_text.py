"""Math in traces for Streamlit markdown: LaTeX becomes $...$, everything else stays inert."""

from __future__ import annotations

import pytest

from viz.math_text import inert, math_markdown


@pytest.mark.parametrize("text, expected", [
    ("Thus \\boxed{120}.", "Thus $\\boxed{120}$\\."),
    ("of \\(a^2b^2\\) in", "of $a^2b^2$ in"),
    ("\\[\n 6 \\times 20 = 120\n \\]", "$6 \\times 20 = 120$"),
    ("What is $a^2b^2$ in $(a+b)^4$?", "What is $a^2b^2$ in $(a+b)^4$?"),
    ("a $$x+y$$ b", "a $x+y$ b"),
    ("\\boxed{\\frac{1}{2}}", "$\\boxed{\\frac{1}{2}}$"),
])
def test_latex_becomes_katex_math(text, expected):
    assert math_markdown(text) == expected


@pytest.mark.parametrize("text", [
    "3 for $1 and $2 each",  # prices: the closing $ is followed by a digit / preceded by a space
    "open \\( never closed",
    "\\boxed{unbalanced",
    "costs \\$5",
])
def test_what_is_not_math_stays_text(text):
    shown = math_markdown(text)
    assert "$" not in shown.replace("\\$", "")  # every dollar is an escaped, literal one
    assert shown == " ".join(inert(text).split())


def test_html_and_markup_never_reach_the_markdown():
    shown = math_markdown("<script>alert(1)</script> **b** [l](http://x) $<img src=x>$")
    assert "<" not in shown and ">" not in shown
    assert shown.startswith("&lt;script&gt;alert\\(1\\)&lt;/script&gt; \\*\\*b\\*\\* \\[l\\]")
    assert shown.endswith("$\\lt img src=x\\gt$")
