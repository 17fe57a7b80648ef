"""Long-context heads: retrieval heads (needle-in-a-haystack copying), streaming heads (a proxy of
DuoAttention's gates) and attention sinks, for the current analysis' model."""

from dataclasses import replace

import numpy as np
import pandas as pd
import streamlit as st

from backend.analyses import long_context as lc
from backend.analyses.heads import head_label, parse_head_label
from pages import shared
from pages.view_requests import long_context_heads as requests
from viz.comparison import GRID_SELECTION, picked_cell, score_grid
from viz.long_context_heads import (haystack_attention, heads_frame, layer_shares, needle_html,
                                    scatter_head, score_scatter)

TITLES = {"retrieval": "retrieval score", "streaming": "streaming score",
          "sink_alpha": "first-token attention α"}
# Wu et al.'s retrieval heads (> 0.1); streaming: our choice; Gu et al.'s epsilon
THRESHOLDS = {"lc_ret": 0.1, "lc_str": 0.9, "lc_eps": 0.3}
EXPLANATIONS = """
- **Retrieval score** (Wu et al. 2024, *Retrieval Head Mechanistically Explains Long-Context
  Factuality*): a needle sentence is hidden in a generated haystack and the model answers a
  question about it by greedy decoding. At each generated token a head scores when its most
  attended token (top-1) lies in the needle **and** is the token being generated: it copies.
  Score = copied tokens / tokens to copy, averaged over haystack lengths and needle depths,
  counting only trials whose answer recalls the needle (ROUGE-1 recall > 0.5). The paper calls
  heads above 0.1 retrieval heads.
- **Streaming score**: a training-free **proxy** of DuoAttention's gates (Xiao et al. 2024),
  which are trained, not measured. On a passkey input, each head alone attends only to the first
  *sink* tokens and the last *recent* tokens; the score is 1 − the relative change of that head's
  own output on the question's tokens (clipped at 0). Near 1: the head does not need the long
  context (a streaming head); low: it reads far back (DuoAttention keeps such heads' full cache).
- **First-token attention α** (StreamingLLM, Xiao et al. 2023; Gu et al. 2024, *When Attention
  Sink Emerges*): mean over every query of the weight on the first token, on the passkey input.
  A head is sink-dominated when α > ε (the paper's ε = 0.3).

Default settings follow the machine: on a CPU 1,000 and 2,000 tokens × depths 25/75 % and 16
new tokens (a few minutes); on a GPU the paper's 10 depths and 50 new tokens over 1,000 to 8,000
tokens. Longer haystacks are a setting away.
"""


def _numbers(text: str, kind) -> list:
    return [kind(x) for x in text.replace(";", ",").split(",") if x.strip()]


def _settings_form(record) -> dict | None:
    """The probe's settings typed by the user, or None to keep the ones shown."""
    with st.expander("Probe settings (needle, question, haystack lengths and depths)"):
        with st.form("lc_form"):
            needle = st.text_input("Needle", value=record.text if record else lc.NEEDLE)
            params = dict(record.params) if record else lc.DEFAULTS
            question = st.text_input("Question", value=params["question"])
            start = st.text_input("Start of the answer, given to the model (empty: the paper's "
                                  "setting, the model writes the whole needle)",
                                  value=params["answer_start"])
            lengths = st.text_input("Haystack lengths (tokens, comma-separated)",
                                    value=", ".join(map(str, params["lengths"])))
            depths = st.text_input("Needle depths (0 = start, 1 = end)",
                                   value=", ".join(map(str, params["depths"])))
            if not st.form_submit_button("Run the probe"):
                return None
    try:
        return {"needle": needle, "question": question, "answer_start": start,
                "lengths": _numbers(lengths, int), "depths": _numbers(depths, float)}
    except ValueError:
        st.error("Lengths are whole numbers and depths numbers from 0 to 1, separated by "
                 "commas.")
        return None


def _probe_id(record, results) -> str | None:
    linked = st.query_params.get("lc")
    if linked and "lc_custom" not in st.session_state:
        return linked
    try:
        custom = st.session_state.get("lc_custom")
        request = (lc.probe_request(record.model, device=shared.service().device_name(), **custom) if custom else results.for_state(
            replace(results.state, a=record.id, lc=None)).request("long_context_heads"))
    except Exception as e:  # a refused setting: say so, keep the page
        st.error(str(e))
        return None
    return shared.derived(request, "Long-context probe")


def _trial_detail(aid: str, probe, layer: int, head: int) -> None:
    """One trial: the answer, the head's attention over the haystack and on the needle, and
    its top-1 token at each answer step."""
    service, trials = shared.service(), probe.meta["trials"]
    names = [f"{t['length']:,} tokens, needle at {t['depth']:.0%}: recall {t['recall']:.2f}"
             f"{'' if t['accepted'] else ' (not counted)'}" for t in trials]
    index = st.selectbox("Trial", range(len(trials)), format_func=names.__getitem__,
                         key="lc_trial")
    t = trials[index]
    st.markdown(f"**Answer:** {shared.plain(dict(probe.params).get('answer_start', ''))} "
                f"*{shared.plain(t['answer'])}*")
    edges = service.array(aid, "bin_edges")[index]
    bins = service.array(aid, "attention_bins")[index, layer, head]
    st.altair_chart(haystack_attention(bins, edges, tuple(t["needle"]), t["question_at"],
                                       f"{head_label(layer, head)} during the copy "
                                       f"(mean over the {len(t['generated'])} answer tokens)"))
    span = service.array(aid, "span_attention")[index, layer, head]
    st.caption("The haystack around the needle (underlined); the tokens to copy shaded by this "
               "head's mean attention on each while answering.")
    st.html(needle_html(t["excerpt"], t["excerpt_start"], tuple(t["needle"]), tuple(t["span"]),
                        span))
    top = service.array(aid, "top_keys")[index, :len(t["generated"]), layer, head]
    lo, excerpt = t["excerpt_start"], t["excerpt"]
    st.dataframe(pd.DataFrame({
        "generated": t["generated"],
        "top-1 token position": top,
        "token there": [excerpt[k - lo] if 0 <= k - lo < len(excerpt) else "" for k in top],
        "copy": [bool(t["span"][0] <= k < t["span"][1]) and excerpt[k - lo] == g
                 if 0 <= k - lo < len(excerpt) else False
                 for k, g in zip(top, t["generated"])],
    }), hide_index=True)


def _pick(key: str, reader) -> None:
    picked = reader(st.session_state.get(key))
    if picked:
        st.session_state["lc_head"] = head_label(*picked)


def _from_link(labels: list[str]) -> None:
    """Settings a link carries, taken once (widgets keep them afterwards)."""
    link = st.query_params
    for key, allowed in (("lc_score", lc.SCORES), ("lc_x", lc.SCORES), ("lc_y", lc.SCORES),
                         ("lc_head", labels)):
        if link.get(key) in allowed:
            st.session_state.setdefault(key, link[key])
    try:
        eps = float(link.get("lc_eps", ""))
    except ValueError:
        return
    if 0.0 <= eps <= 1.0:
        st.session_state.setdefault("lc_eps", eps)


def probe_view(aid: str, probe, record) -> None:
    """Every head's long-context scores: role shares, the grid, the scatter, one head's trials."""
    st.query_params["lc"] = aid
    service, meta = shared.service(), probe.meta
    scores = {name: service.array(aid, name) for name in lc.SCORES}
    _from_link([head_label(a, b) for a in range(meta["n_layers"])
                for b in range(meta["n_heads"])])
    accepted = sum(t["accepted"] for t in meta["trials"])
    st.caption(f"{meta['model_label']}: {meta['n_layers']} layers × {meta['n_heads']} heads; "
               f"{len(meta['trials'])} haystack trials, {accepted} retrieved the needle; "
               f"streaming and sinks on a {meta['passkey_tokens']:,}-token passkey input "
               f"(sink {meta['settings']['sink']}, recent {meta['settings']['recent']} "
               "tokens).")
    with st.expander("What the scores mean"):
        st.markdown(EXPLANATIONS)
    if not accepted:
        st.warning("No trial retrieved the needle (ROUGE-1 recall > 0.5), so no head has a "
                   "retrieval score: try shorter haystacks or give the start of the answer.")
    c1, c2, c3 = st.columns(3)
    for key, default in THRESHOLDS.items():
        st.session_state.setdefault(key, default)
    above = c1.slider("Retrieval head: score above", 0.0, 1.0, step=0.05, key="lc_ret")
    stream = c2.slider("Streaming head: score above", 0.0, 1.0, step=0.05, key="lc_str")
    eps = c3.slider("Sink head: α above ε", 0.0, 1.0, step=0.05, key="lc_eps")
    shares = lc.role_shares(scores, above, stream, eps)
    for column, (role, share) in zip(st.columns(3), shares.items()):
        column.metric(f"{role} heads", f"{share:.0%}")
    score = st.radio("Colour the grid by", lc.SCORES, format_func=TITLES.get,
                     horizontal=True, key="lc_score")
    picked = parse_head_label(st.session_state.get("lc_head")) or (0, 0)
    left, right = st.columns(2)
    with left:
        values = np.nan_to_num(scores[score], nan=0.0)
        st.altair_chart(score_grid(values, "layer", "head", TITLES[score], picked=picked,
                                   cell=max(8, min(22, 440 // meta["n_heads"]))),
                        key="lc_grid", on_select=lambda: _pick("lc_grid", picked_cell),
                        selection_mode=GRID_SELECTION)
        st.altair_chart(layer_shares(lc.sink_shares(scores["sink_alpha"], eps)[0],
                                     f"Sink-dominated heads per layer (α > {eps:.2f})"))
    frame = heads_frame({**scores, "streaming_error": service.array(aid,
                                                                     "streaming_error")})
    with right:
        x = st.selectbox("x", lc.SCORES, format_func=TITLES.get, key="lc_x")
        y = st.selectbox("y", lc.SCORES, index=1, format_func=TITLES.get, key="lc_y")
        st.altair_chart(score_scatter(frame, x, y, TITLES, picked), key="lc_scatter",
                        on_select=lambda: _pick("lc_scatter", scatter_head),
                        selection_mode="lc_head")
    labels = list(frame["label"])
    st.selectbox("Head", labels, key="lc_head")
    layer, head = parse_head_label(st.session_state["lc_head"])
    st.subheader(f"Layer {layer}, head {head}")
    st.caption(" · ".join(f"{TITLES[n]} {scores[n][layer, head]:.3f}" for n in lc.SCORES))
    _trial_detail(aid, probe, layer, head)
    st.download_button("Download every head's scores (CSV)", frame.to_csv(index=False),
                       file_name="long_context_heads.csv", mime="text/csv")
    shared.share_link({"a": record.id, "lc": aid, "lc_score": score,
                       "lc_head": st.session_state["lc_head"], "lc_eps": eps})


def render(results, state) -> None:
    st.header("Long-context heads")
    record = shared.require_analysis()
    if record:
        custom = _settings_form(None if "lc" not in st.query_params else
                                shared.load_analysis(st.query_params["lc"],
                                                     shared.kind_views.PROBES))
        if custom is not None:
            st.session_state["lc_custom"] = custom
            st.query_params.pop("lc", None)
        aid = _probe_id(record, results)
        probe = shared.load_analysis(aid, shared.kind_views.PROBES) if aid else None
        if probe:
            probe_view(aid, probe, record)


if __name__ == "__main__":
    shared.show("long_context_heads", requests, render)
