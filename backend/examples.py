"""Ready examples offered in the sidebar: (model reference, text) by name."""

from pathlib import Path

from backend.models import DEFAULT_CAUSAL
from backend.rollouts.base import TEMPERATURE, TOP_P

EXAMPLES = {
    "Winograd: what does 'it' refer to?": (
        DEFAULT_CAUSAL, "The trophy didn't fit in the suitcase because it was too big."),
    "Repeated text (induction heads)": (
        DEFAULT_CAUSAL, "Mr and Mrs Dursley of number four, Privet Drive, were proud to say. "
                        "Mr and Mrs Dursley of number four, Privet Drive, were proud to say."),
    "Code": (DEFAULT_CAUSAL, "def area(radius):\n    return 3.14159 * radius ** 2\n\n"
                             "print(area(2.0))"),
    "Encoder (all-MiniLM-L6-v2)": (
        "minilm", "The animal didn't cross the street because it was too tired."),
}
DEFAULT_EXAMPLE = next(iter(EXAMPLES))

# The Compare page's first pair: one word changes what "it" refers to.
COMPARISON_EXAMPLE = (EXAMPLES[DEFAULT_EXAMPLE][1],
                      EXAMPLES[DEFAULT_EXAMPLE][1].replace("too big", "too small"))

# The worked Thought Anchors problem: the default model writes its own trace for it.
# The published trace the Thought Anchors page opens on (folder, label): MIT-licensed data of the
# paper's authors, shipped with its licence (see the folder's README).
PUBLISHED_EXAMPLE = (Path(__file__).resolve().parent / "data" / "thought_anchors"
                     / "deepseek-r1-distill-qwen-14b" / "problem_2238",
                     "DeepSeek-R1-Distill-Qwen-14B")

REASONING_EXAMPLE = {
    "problem": "A shop sells pencils at 3 for $1. How many dollars do 27 pencils cost?",
    "answer": "9",
}
# How the Thought Anchors page and its lessons sample rollouts (the paper's settings).
REASONING_SAMPLING = {"temperature": TEMPERATURE, "top_p": TOP_P}
