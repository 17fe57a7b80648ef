"""A heuristic function tagger for reasoning sentences, for traces without published tags.

The published tags were assigned by a hosted LLM; offline we only have surface cues. The rules
below look for the cue words of each category of the Thought Anchors taxonomy, in order of
specificity, and are meant as a rough guide (the UI says so).
"""

from __future__ import annotations

import re

_RULES: list[tuple[str, re.Pattern]] = [
    ("final_answer_emission", re.compile(r"\\boxed|final answer|the answer is", re.I)),
    ("self_checking", re.compile(r"\b(let me (check|verify|double.check)|verify|double.check|"
                                 r"check(ing)? (that|again|if)|confirm|plug(ging)? (it|back))\b",
                                 re.I)),
    ("uncertainty_management", re.compile(r"\b(wait|hmm|but|maybe|perhaps|not sure|actually|"
                                          r"mistake|wrong|reconsider|alternatively)\b", re.I)),
    ("plan_generation", re.compile(r"\b(i need to|i should|let me|let's|first,|next,|then i|"
                                   r"we need to|the plan|approach|strategy|i will|i'll)\b", re.I)),
    ("result_consolidation", re.compile(r"\b(so|therefore|thus|hence|in total|altogether|"
                                        r"that means|which gives)\b", re.I)),
    ("active_computation", re.compile(r"[=+\-*/^×÷]|\d\s*[+\-*/x]\s*\d|\\frac|\\sqrt")),
    ("fact_retrieval", re.compile(r"\b(recall|formula|is defined|definition|we know|"
                                  r"known|theorem|property|rule)\b", re.I)),
    ("problem_setup", re.compile(r"\b(the problem|we are given|given|asks|we have|"
                                 r"there (is|are)|find)\b", re.I)),
]


def heuristic_tag(sentence: str) -> str:
    """The first category whose cue matches, else "unknown"."""
    for tag, pattern in _RULES:
        if pattern.search(sentence):
            return tag
    return "unknown"
