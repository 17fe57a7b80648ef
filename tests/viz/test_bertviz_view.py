"""viz.bertviz_view: offline, escaped, size-bounded bertviz HTML; rendered in a real chromium."""

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from viz import bertviz_view
from viz.bertviz_view import (
    MAX_EMBEDDED_VALUES,
    MAX_TOKENS,
    embedded_values,
    head_view_html,
    model_view_html,
)

REPO = Path(__file__).resolve().parents[2]
VENDOR = REPO / "viz" / "vendor"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

XSS_TOKENS = [
    "</script><script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<!--<script>",
    "</SCRIPT >",
    "a & b",
]


def causal_attention(n_layers, n_heads, n_tokens, seed=0, dtype=np.float32):
    """Random causal attention (layer, head, query, key); each row sums to 1."""
    rng = np.random.default_rng(seed)
    scores = np.tril(rng.random((n_layers, n_heads, n_tokens, n_tokens)) ** 3)
    scores[..., 0, 0] = 1.0
    return (scores / scores.sum(-1, keepdims=True)).astype(dtype)


class _ScriptsAndTexts(HTMLParser):
    """The <script> elements (attributes, content) and the text of SVG <text> elements, as an
    HTML tokenizer sees them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.scripts, self.texts, self.tags = [], [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("script", "text"):
            self._in = (tag, dict(attrs), [])

    def handle_endtag(self, tag):
        if self._in and tag == self._in[0]:
            name, attrs, parts = self._in
            if name == "script":
                self.scripts.append((attrs, "".join(parts)))
            else:
                self.texts.append("".join(parts))
            self._in = None

    def handle_data(self, data):
        if self._in:
            self._in[2].append(data)


def parse(html):
    parser = _ScriptsAndTexts()
    parser.feed(html)
    parser.close()
    return parser


def embedded_params(html):
    """The params JSON element, read by an HTML tokenizer then a JSON parser."""
    scripts = parse(html).scripts
    blocks = [body for attrs, body in scripts if attrs.get("type") == "application/json"]
    assert len(blocks) == 1
    return json.loads(blocks[0])


# --- offline ------------------------------------------------------------------------------------

@pytest.mark.parametrize("render", [head_view_html, model_view_html])
def test_loads_nothing_from_the_network(render):
    html = render(causal_attention(2, 3, 5), list("abcde"))
    parsed = parse(html)
    assert parsed.scripts and all("src" not in attrs for attrs, _ in parsed.scripts)
    assert "link" not in parsed.tags and "iframe" not in parsed.tags and "img" not in parsed.tags
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    styles = re.findall(r"<style>(.*?)</style>|style=\"([^\"]*)\"", html.split("<script")[0], re.S)
    assert styles and not any(re.search(r"@import|url\(", "".join(s), re.I) for s in styles)
    # bertviz's require.config (CDN paths for d3 and jQuery) is removed, not merely unused
    assert "cdnjs" not in html and "require.config" not in html
    assert "default-src 'none'" in html  # CSP: the page may fetch nothing


@pytest.mark.parametrize("render", [head_view_html, model_view_html])
def test_inlines_the_vendored_libraries_and_bertviz_js(render):
    html = render(causal_attention(1, 2, 4), list("abcd"))
    for name in ("d3.min.js", "jquery.slim.min.js"):
        assert (VENDOR / name).read_text(encoding="utf-8") in html
    bertviz_dir = Path(importlib.util.find_spec("bertviz").submodule_search_locations[0])
    script = "head_view.js" if render is head_view_html else "model_view.js"
    source = (bertviz_dir / script).read_text(encoding="utf-8")
    body = source[source.index("requirejs(["):]  # everything after the removed require.config
    assert body.replace(
        "const params = PYTHON_PARAMS;",
        'const params = JSON.parse(document.getElementById("bertviz-params").textContent);',
    ) in html


def test_vendored_files_match_their_readme_and_stay_small():
    readme = (VENDOR / "README.md").read_text(encoding="utf-8")
    for name in ("d3.min.js", "jquery.slim.min.js"):
        digest = hashlib.sha256((VENDOR / name).read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(name)}`.*`{digest}`", readme), name
    for license_file in ("d3.LICENSE", "jquery.LICENSE"):
        assert "Permission" in (VENDOR / license_file).read_text() or "Redistribution" in (
            VENDOR / license_file).read_text()
    assert sum(f.stat().st_size for f in VENDOR.iterdir()) < 400_000


def test_does_not_import_torch_or_the_bertviz_package():
    code = (
        "import sys, numpy as np\n"
        "from viz.bertviz_view import head_view_html, model_view_html\n"
        "a = np.full((1, 1, 2, 2), 0.5)\n"
        "head_view_html(a, ['x', 'y']); model_view_html(a, ['x', 'y'])\n"
        "print(sorted(m for m in ('torch', 'bertviz', 'IPython') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# --- size ---------------------------------------------------------------------------------------

def test_embedded_values_counts_layers_heads_and_token_pairs():
    shape = (30, 9, 128, 128)
    assert embedded_values(shape) == 4_423_680
    assert embedded_values(shape, layers=[3, 7]) == 294_912
    assert embedded_values(np.zeros((2, 3, 4, 4)), layers=[1], heads=[0, 2]) == 32


def test_html_grows_with_the_layers_included():
    attention = causal_attention(8, 4, 96)
    tokens = [f"tok{i}" for i in range(96)]
    one = len(head_view_html(attention, tokens, layers=[5]))
    two = len(head_view_html(attention, tokens, layers=[5, 2]))
    every = len(head_view_html(attention, tokens))
    assert every > 3 * one
    assert every - one == pytest.approx(7 * (two - one), rel=0.05)  # linear in layers
    m_one = len(model_view_html(attention, tokens, layers=[5], heads=[1]))
    m_two = len(model_view_html(attention, tokens, layers=[5], heads=[1, 2]))
    m_every = len(model_view_html(attention, tokens))
    assert m_every - m_one == pytest.approx(31 * (m_two - m_one), rel=0.05)


def test_refuses_more_than_the_budget(monkeypatch):
    attention = causal_attention(4, 2, 8)
    tokens = list("abcdefgh")
    monkeypatch.setattr(bertviz_view, "MAX_EMBEDDED_VALUES", 2 * 2 * 8 * 8)
    head_view_html(attention, tokens, layers=[0, 3])
    model_view_html(attention, tokens, layers=[0, 1], heads=[0, 1])
    with pytest.raises(ValueError, match="exceed MAX_EMBEDDED_VALUES"):
        head_view_html(attention, tokens, layers=[0, 1, 2])
    with pytest.raises(ValueError, match="exceed MAX_EMBEDDED_VALUES"):
        model_view_html(attention, tokens, layers=[0, 1, 2], heads=[0, 1])
    assert MAX_EMBEDDED_VALUES >= 9 * 128 * 128  # one SmolLM2 layer at MAX_TOKENS fits


# --- escaping -----------------------------------------------------------------------------------

@pytest.mark.parametrize("render", [head_view_html, model_view_html])
def test_tokens_cannot_break_out_of_the_script_element(render):
    tokens = ["The", *XSS_TOKENS, "end"]
    html = render(causal_attention(1, 2, len(tokens)), tokens)
    assert "</script><script>alert" not in html
    assert "<img" not in html.lower() and "<!--" not in html and "</SCRIPT >" not in html
    parsed = parse(html)
    assert len(parsed.scripts) == 6  # params JSON, d3, jQuery, requirejs shim, bertviz, fit
    assert "img" not in parsed.tags
    params = embedded_params(html)
    assert params["attention"][0]["left_text"] == tokens
    assert params["attention"][0]["right_text"] == tokens


def test_bertviz_js_writes_tokens_as_text_not_html():
    bertviz_dir = Path(importlib.util.find_spec("bertviz").submodule_search_locations[0])
    for script in ("head_view.js", "model_view.js"):
        source = (bertviz_dir / script).read_text(encoding="utf-8")
        assert ".html(" not in source and "innerHTML" not in source, script
        assert re.search(r"\.text\((d => d|function \(d\) \{\s*return d;)", source), script


# --- content ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_head_view_embeds_the_chosen_layers_rounded(dtype):
    attention = causal_attention(5, 3, 7, seed=1, dtype=dtype)
    tokens = ["naïve", "東京", " space", "Ġtok", "x", "y", "z"]
    html = head_view_html(attention, tokens, layers=[4, 1], heads=[2], default_layer=1)
    params = embedded_params(html)
    assert params["attention"][0]["left_text"] == tokens
    embedded = np.array(params["attention"][0]["attn"])
    assert embedded.shape == (2, 3, 7, 7)
    np.testing.assert_allclose(embedded, attention[[4, 1]].astype(np.float64), rtol=0, atol=5.01e-5)
    numbers = re.findall(r"[\d.e+-]+", re.search(r'"attn":(\[.*?\]{4})', html).group(1))
    assert len(numbers) == 2 * 3 * 7 * 7
    assert all(re.fullmatch(r"0|1|0\.\d{0,3}[1-9]", n) for n in numbers)  # 4 decimals at most
    assert embedded[0, 0, 0].tolist() == [1, 0, 0, 0, 0, 0, 0]
    assert params["include_layers"] == [4, 1] and params["layer"] == 1 and params["heads"] == [2]


def test_model_view_embeds_the_chosen_layers_and_heads():
    attention = causal_attention(4, 5, 6, seed=2)
    html = model_view_html(attention, list("abcdef"), layers=[3, 0], heads=[4, 1, 2])
    params = embedded_params(html)
    embedded = np.array(params["attention"][0]["attn"])
    assert embedded.shape == (2, 3, 6, 6)
    np.testing.assert_allclose(embedded[1, 0], attention[0, 4], atol=5.01e-5)
    np.testing.assert_allclose(embedded[0, 2], attention[3, 2], atol=5.01e-5)
    assert params["include_layers"] == [3, 0] and params["include_heads"] == [4, 1, 2]
    assert params["total_heads"] == 5


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("render", [head_view_html, model_view_html])
@pytest.mark.parametrize(
    "shape, n_tokens, message",
    [
        ((2, 4, 4), 4, "4 dimensions"),
        ((1, 2, 3, 4, 4), 4, "4 dimensions"),
        ((1, 2, 4, 5), 4, "query == key"),
        ((1, 2, 4, 4), 5, "covers 4 tokens .* 5 tokens were given"),
        ((0, 2, 4, 4), 4, "no layers or no heads"),
        ((1, 1, MAX_TOKENS + 1, MAX_TOKENS + 1), MAX_TOKENS + 1, "MAX_TOKENS"),
    ],
)
def test_wrong_shapes_are_refused(render, shape, n_tokens, message):
    with pytest.raises(ValueError, match=message):
        render(np.full(shape, 0.25, dtype=np.float32), [f"t{i}" for i in range(n_tokens)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": [2]}, r"layer indices \[2\] out of range"),
        ({"layers": [0, 0]}, "layer indices repeat"),
        ({"layers": []}, "at least one layer"),
        ({"heads": [-1]}, r"head indices \[-1\] out of range"),
        ({"layers": [1], "default_layer": 0}, "default_layer 0 is not one of"),
    ],
)
def test_wrong_indices_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        head_view_html(causal_attention(2, 2, 3), list("abc"), **kwargs)


def test_wrong_values_and_types_are_refused():
    attention = causal_attention(1, 1, 3)
    attention[0, 0, 2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        head_view_html(attention, list("abc"))
    with pytest.raises(TypeError, match="floats"):
        model_view_html(np.ones((1, 1, 2, 2), dtype=np.int64), ["a", "b"])
    with pytest.raises(TypeError, match="str"):
        head_view_html(np.full((1, 1, 2, 2), 0.5), ["a", 7])
    with pytest.raises(TypeError, match="list of str"):
        head_view_html(np.full((1, 1, 2, 2), 0.5), "ab")
    with pytest.raises(ValueError, match="display_mode"):
        model_view_html(np.full((1, 1, 2, 2), 0.5), ["a", "b"], display_mode="blue")


# --- real browser -------------------------------------------------------------------------------

def rendered_dom(html, tmp_path):
    """The DOM after chromium has run the page's scripts, with no network."""
    page = tmp_path / "view.html"
    page.write_text(html, encoding="utf-8")
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_head_view_renders_in_chromium(tmp_path):
    tokens = ["The", "cat", *XSS_TOKENS[:2], "sat", "."]
    n_heads = 3
    html = head_view_html(causal_attention(2, n_heads, len(tokens)), tokens, default_layer=1)
    dom = rendered_dom(html, tmp_path)
    parsed = parse(dom)
    assert parsed.texts == tokens + tokens  # left column, right column: the JS ran
    assert dom.count("<line ") == n_heads * len(tokens) ** 2  # one arc per head and token pair
    assert "img" not in parsed.tags  # the token stayed text
    assert re.search(r'<option value="1"[^>]*>1</option>', dom)


def test_model_view_renders_in_chromium(tmp_path):
    tokens = ["a", "b", XSS_TOKENS[1], "d"]
    html = model_view_html(causal_attention(3, 4, len(tokens)), tokens, layers=[0, 2], heads=[1, 3])
    dom = rendered_dom(html, tmp_path)
    parsed = parse(dom)
    assert parsed.texts[:3] == ["Heads", "1", "3"] and parsed.texts[4:6] == ["0", "2"]
    assert dom.count("<line ") == 2 * 2 * len(tokens) ** 2
    assert "img" not in parsed.tags
