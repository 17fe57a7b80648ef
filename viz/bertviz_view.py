"""bertviz head and model views as standalone HTML documents that render offline.

bertviz's own `head_view` / `model_view` need torch, load require.js, d3 and jQuery from a CDN
(blank offline) and embed every layer's attention twice. Here the same bertviz JavaScript, read
from the installed package at call time, is wrapped in one HTML document with d3 and jQuery
inlined from `viz/vendor/`, only the chosen layers embedded, and weights rounded to 4 decimals.

Pure: numpy arrays and token strings in, an HTML string out. The bertviz Python package is never
imported (it imports torch); only its .js files are read.

Shapes: `attention` is `(layer, head, query, key)`, one row per query token summing to 1.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import operator
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_TOKENS = 128
"""Longest sequence either view accepts."""

MAX_EMBEDDED_VALUES = 1_000_000
"""Most attention weights one document may embed: at most about 8 MB of HTML (4 to 8 bytes a
weight). Use `embedded_values` to choose layers (and, for the model view, heads) that fit."""

DECIMALS = 4
"""Decimals kept for each attention weight."""

_VENDOR_DIR = Path(__file__).with_name("vendor")
_VENDORED_SCRIPTS = ("d3.min.js", "jquery.slim.min.js")
_ROOT_ID = "bertviz"
_PARAMS_ID = "bertviz-params"

# bertviz's scripts start with a require.config block that points at the CDN; it is removed and
# a minimal `requirejs` hands bertviz's factory the inlined globals instead.
_REQUIRE_CONFIG = re.compile(r"require\.config\(\{.*?\}\);", re.DOTALL)
_PARAMS_MARKER = "const params = PYTHON_PARAMS;"
_PARAMS_FROM_JSON = (
    f'const params = JSON.parse(document.getElementById("{_PARAMS_ID}").textContent);'
)
_REQUIREJS_SHIM = """\
function requirejs(deps, factory) {
    var modules = {d3: window.d3, jquery: window.jQuery};
    factory.apply(window, deps.map(function (name) {
        if (!modules[name]) { throw new Error("bertviz_view: " + name + " is not inlined"); }
        return modules[name];
    }));
}"""

# A <script> element ends at "</script" and "<!--" can switch the parser into a state where it
# does not; JSON with no "<" at all is safe. "\u003c" is the same string once JSON-parsed.
# The model view's thumbnails have a fixed size: narrow frames scale the drawing down to fit
# their width (and so its height) rather than cut heads off on the right.
_FIT_TO_WIDTH = f"""\
(function () {{
    var root = document.getElementById("{_ROOT_ID}");
    function fit() {{
        root.style.zoom = 1;
        var room = document.documentElement.clientWidth - 16;
        root.style.zoom = Math.min(1, room / Math.max(root.scrollWidth, 1));
    }}
    fit();
    window.addEventListener("resize", fit);
}})();"""

_JSON_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}
_UNSAFE_IN_SCRIPT = re.compile(r"</script|<!--", re.IGNORECASE)
# 4-decimal weights are printed by Python as "0.0", "1.0" or "0.1234"; "0" and "1" are shorter.
_TRAILING_POINT_ZERO = re.compile(r"(?<![\d.])(\d+)\.0(?=[,\]])")

_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; \
script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<title>{title}</title>
<style>body {{ margin: 8px; background: white; }}</style>
</head>
<body>
<div id="{root_id}" style="font-family: 'Helvetica Neue', Helvetica, Arial, sans-serif;">
{controls}
<div id="vis"></div>
</div>
<script type="application/json" id="{params_id}">{params_json}</script>
{scripts}
</body>
</html>
"""


def embedded_values(
    attention: np.ndarray | Sequence[int],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> int:
    """Number of attention weights a document would embed.

    `attention` is the `(layer, head, query, key)` array or just its shape. `layers` / `heads`
    default to all. The head view embeds every head of each chosen layer (its `heads` only picks
    which start visible), so size it with `heads=None`; the model view embeds only `heads`.
    """
    shape = tuple(np.shape(attention)) if isinstance(attention, np.ndarray) else tuple(attention)
    if len(shape) != 4:
        raise ValueError(
            f"attention must have 4 dimensions (layer, head, query, key), got shape {shape}"
        )
    n_layers, n_heads, n_query, n_key = shape
    n_layers = n_layers if layers is None else len(layers)
    n_heads = n_heads if heads is None else len(heads)
    return int(n_layers * n_heads * n_query * n_key)


def head_view_html(
    attention: np.ndarray,
    tokens: Sequence[str],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    default_layer: int | None = None,
) -> str:
    """bertviz head view of `attention` `(layer, head, query, key)` as one offline HTML document.

    layers: layer indices to embed and list in the layer menu (default all). Every head of each
        embedded layer is included.
    heads: head indices shown at first (default all); the others can be switched on in the page.
    default_layer: layer selected at first, one of `layers` (default the first of them).
    tokens are shown exactly as given (pass display strings, e.g. with "Ġ" already decoded).
    The page draws one layer at a time, head x query x key lines.
    """
    weights = _check_attention(attention, tokens)
    layers = _check_indices(layers, weights.shape[0], "layer")
    heads = None if heads is None else _check_indices(heads, weights.shape[1], "head")
    if default_layer is None:
        default_layer = layers[0]
    elif default_layer not in layers:
        raise ValueError(
            f"default_layer {default_layer} is not one of the included layers {layers}"
        )
    _check_budget(embedded_values(weights.shape, layers))

    options = {
        "default_filter": "0",
        "root_div_id": _ROOT_ID,
        "layer": default_layer,
        "heads": heads,
        "include_layers": layers,
    }
    controls = '<span style="user-select:none">Layer: <select id="layer"></select></span>'
    return _page("bertviz head view", controls, "head_view.js", weights[layers], tokens, options)


def model_view_html(
    attention: np.ndarray,
    tokens: Sequence[str],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    display_mode: str = "light",
) -> str:
    """bertviz model view (a thumbnail per layer and head) of `attention`
    `(layer, head, query, key)` as one offline HTML document.

    layers, heads: indices to embed and draw (default all); rows and columns are labelled with
        the original indices. Every embedded weight becomes an SVG line, so the browser's work
        grows with `embedded_values(attention, layers, heads)`: headless chromium on 2 cores drew
        147k weights (1 layer x 9 heads x 128 tokens) in about 4 s and 885k in about 17 s.
    display_mode: "light" or "dark" thumbnails.
    """
    weights = _check_attention(attention, tokens)
    layers = _check_indices(layers, weights.shape[0], "layer")
    heads = _check_indices(heads, weights.shape[1], "head")
    if display_mode not in ("light", "dark"):
        raise ValueError(f"display_mode must be 'light' or 'dark', got {display_mode!r}")
    _check_budget(embedded_values(weights.shape, layers, heads))

    options = {
        "default_filter": "0",
        "display_mode": display_mode,
        "root_div_id": _ROOT_ID,
        "include_layers": layers,
        "include_heads": heads,
        "total_heads": int(weights.shape[1]),
    }
    controls = '<span style="user-select:none"></span>'
    selected = weights[np.ix_(layers, heads)]
    return _page("bertviz model view", controls, "model_view.js", selected, tokens, options)


def _check_attention(attention: np.ndarray, tokens: Sequence[str]) -> np.ndarray:
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens must be a list of str, got {type(tokens).__name__}")
    bad = [type(t).__name__ for t in tokens if not isinstance(t, str)]
    if bad:
        raise TypeError(f"tokens must all be str, got {bad[0]}")
    weights = np.asarray(attention)
    if not np.issubdtype(weights.dtype, np.floating):
        raise TypeError(f"attention must hold floats, got dtype {weights.dtype}")
    if weights.ndim != 4:
        raise ValueError(
            f"attention must have 4 dimensions (layer, head, query, key), got shape {weights.shape}"
        )
    n_layers, n_heads, n_query, n_key = weights.shape
    if n_layers == 0 or n_heads == 0:
        raise ValueError(f"attention has no layers or no heads: shape {weights.shape}")
    if n_query != n_key:
        raise ValueError(
            f"attention must be self-attention with query == key length, got shape {weights.shape}"
        )
    if n_query != len(tokens):
        raise ValueError(
            f"attention covers {n_query} tokens (shape {weights.shape}) "
            f"but {len(tokens)} tokens were given"
        )
    if not 0 < n_query <= MAX_TOKENS:
        raise ValueError(f"{n_query} tokens: the views take 1 to MAX_TOKENS = {MAX_TOKENS} tokens")
    return weights


def _check_indices(indices: Sequence[int] | None, size: int, what: str) -> list[int]:
    if indices is None:
        return list(range(size))
    try:
        checked = [operator.index(i) for i in indices]
    except TypeError:
        raise TypeError(f"{what} indices must be integers, got {list(indices)!r}") from None
    if not checked:
        raise ValueError(f"at least one {what} must be included")
    if len(set(checked)) != len(checked):
        raise ValueError(f"{what} indices repeat: {checked}")
    out_of_range = [i for i in checked if not 0 <= i < size]
    if out_of_range:
        raise ValueError(
            f"{what} indices {out_of_range} out of range: attention has {size} {what}s"
        )
    return checked


def _check_budget(values: int) -> None:
    if values > MAX_EMBEDDED_VALUES:
        raise ValueError(
            f"{values:,} attention weights exceed MAX_EMBEDDED_VALUES = {MAX_EMBEDDED_VALUES:,}: "
            "include fewer layers (or heads) or tokens"
        )


def _weights_json(weights: np.ndarray) -> str:
    rounded = np.round(weights.astype(np.float64), DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    if not np.isfinite(rounded).all():
        raise ValueError("attention contains NaN or infinite values")
    return _TRAILING_POINT_ZERO.sub(r"\1", json.dumps(rounded.tolist(), separators=(",", ":")))


def _params_json(weights: np.ndarray, tokens: list[str], options: dict) -> str:
    """bertviz's params object as JSON, safe inside a <script> element."""
    dump = functools.partial(json.dumps, ensure_ascii=True, separators=(",", ":"))
    entry = dump({"name": None, "left_text": tokens, "right_text": tokens})
    entry = f'{entry[:-1]},"attn":{_weights_json(weights)}}}'
    text = f'{{"attention":[{entry}],{dump(options)[1:]}'
    for char, escape in _JSON_HTML_ESCAPES.items():
        text = text.replace(char, escape)
    return text


def _page(title: str, controls: str, bertviz_script: str, weights: np.ndarray,
          tokens: Sequence[str], options: dict) -> str:
    scripts = [*(_vendored_script(name) for name in _VENDORED_SCRIPTS), _REQUIREJS_SHIM]
    scripts += [_bertviz_script(bertviz_script), _FIT_TO_WIDTH]
    return _PAGE.format(
        title=title,
        root_id=_ROOT_ID,
        controls=controls,
        params_id=_PARAMS_ID,
        params_json=_params_json(weights, list(tokens), options),
        scripts="\n".join(f"<script>\n{script}\n</script>" for script in scripts),
    )


@functools.cache
def _vendored_script(name: str) -> str:
    return _inlinable(name, (_VENDOR_DIR / name).read_text(encoding="utf-8"))


@functools.cache
def _bertviz_script(name: str) -> str:
    """bertviz's `name` (head_view.js or model_view.js) adapted to the inlined libraries."""
    spec = importlib.util.find_spec("bertviz")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("bertviz is not installed (requirements.txt pins bertviz==1.4.1)")
    source = (Path(spec.submodule_search_locations[0]) / name).read_text(encoding="utf-8")
    source, n_configs = _REQUIRE_CONFIG.subn("", source, count=1)
    if n_configs != 1 or source.count(_PARAMS_MARKER) != 1:
        raise RuntimeError(
            f"bertviz's {name} no longer has the require.config block and "
            f"'{_PARAMS_MARKER}' line this module adapts; check the installed bertviz version"
        )
    return _inlinable(name, source.replace(_PARAMS_MARKER, _PARAMS_FROM_JSON))


def _inlinable(name: str, script: str) -> str:
    if _UNSAFE_IN_SCRIPT.search(script):
        raise RuntimeError(f"{name} contains '</script' or '<!--' and cannot be inlined as is")
    return script
