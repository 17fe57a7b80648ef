"""Ready examples offered in the sidebar: (model reference, text) by name, and the Compare
page's first pair. (Not a page itself; streamlit-free, so backend.prepare caches them.)"""

from backend.service import DEFAULT_CAUSAL

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
