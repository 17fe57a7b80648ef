"""Thought Anchors: which sentences of a reasoning trace matter (Bogdan et al., 2025)."""

import numpy as np
import streamlit as st

from backend.analyses import AnalysisRequest
from backend.analyses.thought_anchors import (METRICS, RESAMPLING_ROLLOUTS, RESAMPLING_TOKENS,
                                              WORKED_EXAMPLE)
from backend.examples import REASONING_EXAMPLE
from backend.methods.thought_anchors.tags import TAG_COLORS
from pages import shared
from viz import export
from viz.thought_anchors import link_graph, sentence_list, sentence_matrix

TRACE_PARAM = "t"
SOURCES = [WORKED_EXAMPLE, "Your problem", "Import a published trace"]
EXPLANATION = """
Thought Anchors (Bogdan, Macar, Nanda & Conmy, 2025) asks which sentences of a chain of thought
steer the answer, three ways:
- **Resampling** (black box): regenerate the reasoning from just before each sentence many times.
  *Counterfactual importance* compares the answers when the regenerated sentence means something
  different (cosine < 0.8 with all-MiniLM-L6-v2) against keeping it; *different trajectories* is
  how often it is replaced by something different; *overdeterminedness* how often the same
  sentence comes back anyway.
- **Receiver heads** (white box): heads whose attention concentrates on a few sentences (high
  kurtosis of the sentence-level "vertical" attention). Sentences those heads receive are
  "broadcasting" sentences.
- **Attention suppression** (white box): mask one sentence from every head and measure how much
  the next-token distributions of each later sentence change (log KL).
Function tags of your own traces come from a heuristic keyword tagger (the published ones were
labelled by an LLM): treat them as a rough guide. Attention patterns are not explanations.
"""


def _matrices(trace_id: str, record, parts: dict) -> dict[str, np.ndarray]:
    """(source, target) sentence matrices available for this trace."""
    service, found = shared.service(), {}
    if record.kind == "ta_published":
        for name, label in (("counterfactual", "Counterfactual (published)"),
                            ("suppression_normalized", "Suppression (published)")):
            if name in service.array_names(trace_id):
                found[label] = service.array(trace_id, name)
    if parts.get("suppression"):
        found["Suppression (log KL, row-centred)"] = service.array(parts["suppression"],
                                                                  "suppression_normalized")
    if parts.get("receivers"):
        blocks = service.array(parts["receivers"], "sentence_attention").astype(np.float32)
        heads = service.array(parts["receivers"], "receiver_heads")
        found["Attention (receiver heads)"] = blocks[heads[:, 0], heads[:, 1]].mean(0).T
    if parts.get("resampling"):
        found["Counterfactual (resampling)"] = service.array(parts["resampling"],
                                                             "counterfactual")
    return found


def choose_trace() -> None:
    """Pick or create a trace; sets the `t` query parameter when one is ready."""
    source = st.segmented_control("Trace", SOURCES, default=SOURCES[0], key="ta_source",
                                  bind="query-params") or SOURCES[0]
    model = st.session_state.get("model_choice", "smollm2")
    model = st.session_state.get("other_model", "") if model == "other" else model
    if source == SOURCES[2]:
        files = st.file_uploader("The trace's JSON files (problem.json, base_solution.json, "
                                 "chunks_labeled.json, chunks_resampled.json, "
                                 "step_importance*.json)", type="json",
                                 accept_multiple_files=True)
        label = st.text_input("Label (e.g. the model that wrote it)", "published trace")
        if files and st.button("Import"):
            try:
                trace = shared.service().import_published_trace(
                    {f.name: f.getvalue() for f in files}, label)
            except shared.AtlasError as e:
                st.error(str(e))
                return
            st.query_params[TRACE_PARAM] = trace
        return
    if source == SOURCES[0]:
        problem, answer, own = REASONING_EXAMPLE["problem"], REASONING_EXAMPLE["answer"], ""
        st.markdown(f"**Problem:** {shared.plain(problem)}  \n**Answer:** {answer}")
        # A trace from a link stays open until the user asks for the example.
        if st.query_params.get(TRACE_PARAM) and not st.button("Open the worked example"):
            return
    else:
        problem = st.text_area("Problem", key="ta_problem")
        answer = st.text_input("Reference answer (optional)", key="ta_answer")
        own = st.text_area("Your trace (optional: leave empty to let the model write one)",
                           key="ta_own")
        if not st.button("Analyse this problem"):
            return
    solution = own
    if not solution:
        generated = shared.derived(AnalysisRequest.make("ta_generate", model, problem),
                                   f"{model} writes a solution")
        if not generated:
            return
        solution = shared.service().analysis(generated).meta["solution"]
    trace = shared.derived(AnalysisRequest.make("ta_trace", model, solution, problem=problem,
                                                answer=answer), "Splitting the trace")
    if trace:
        st.query_params[TRACE_PARAM] = trace


def own_trace_parts(record) -> dict[str, str | None]:
    """Run (or fetch) the white-box passes and, on request, the resampling of an own trace."""
    base = dict(record.params)
    parts = {"receivers": shared.derived(AnalysisRequest.make(
        "ta_receivers", record.model, record.text, **base), "Receiver heads")}
    c1, c2, c3 = st.columns(3)
    if c1.toggle("Attention suppression", key="ta_supp", bind="query-params",
                 help="One forward pass per sentence."):
        parts["suppression"] = shared.derived(AnalysisRequest.make(
            "ta_suppression", record.model, record.text, **base), "Attention suppression")
    rollouts = c3.number_input("Rollouts per sentence", 1, 100, RESAMPLING_ROLLOUTS, key="ta_r",
                               bind="query-params")
    if c2.toggle("Resampling", key="ta_resample", bind="query-params",
                 help="Regenerates from every sentence: the slow method, saved as it goes."):
        parts["resampling"] = shared.derived(AnalysisRequest.make(
            "ta_resampling", record.model, record.text, rollouts=int(rollouts),
            max_new_tokens=RESAMPLING_TOKENS, **base),
            f"Resampling ({rollouts} rollouts per sentence)")
    return parts


def per_sentence_scores(trace_id, record, parts) -> dict[str, np.ndarray]:
    service, scores = shared.service(), {}
    sources = [trace_id] if record.kind == "ta_published" else []
    sources += [parts[p] for p in ("resampling",) if parts.get(p)]
    for aid in sources:
        names = set(service.array_names(aid))
        scores.update({m: service.array(aid, m) for m in METRICS if m in names})
    if parts.get("receivers"):
        scores["receiver_score"] = service.array(parts["receivers"], "receiver_scores")
    return scores


st.header("Thought Anchors")
st.caption("Which sentences of a reasoning trace matter: resampling, receiver heads and "
           "attention suppression, on any trace and any causal model.")
trace_id = st.query_params.get(TRACE_PARAM)
with st.expander("Choose a trace", expanded=trace_id is None):
    choose_trace()
trace_id = st.query_params.get(TRACE_PARAM)
record = None
if trace_id:
    record = shared.load_analysis(trace_id, shared.kind_views.TRACES)
if record:
    meta, chunks = record.meta, record.meta["chunks"]
    st.markdown(f"**Problem:** {shared.plain(meta['problem'])}")
    st.markdown(f"**Answer in the trace:** {shared.plain(str(meta.get('answer')))} · "
                f"**model:** {shared.plain(meta.get('model_label', record.model))} · "
                f"**{len(chunks)} sentences** · tags: {meta['tags_source']}")
    parts = {} if record.kind == "ta_published" else own_trace_parts(record)
    scores = per_sentence_scores(trace_id, record, parts)
    matrices = _matrices(trace_id, record, parts)
    left, right = st.columns([3, 2])
    with left:
        names = list(scores) or ["none"]
        preferred = [m for m in ("counterfactual_importance_kl", "receiver_score") if m in names]
        metric = st.selectbox("Colour sentences by", names, key="ta_metric", bind="query-params",
                              index=names.index(preferred[0]) if preferred else 0)
        sentence = st.selectbox("Sentence", range(len(chunks)), index=None, key="ta_s",
                                bind="query-params", format_func=lambda i: f"{i}: {chunks[i][:60]}")
        st.html(sentence_list(chunks, scores.get(metric), meta["tags"], TAG_COLORS, sentence))
    with right:
        if matrices:
            which = st.selectbox("Sentence × sentence matrix", list(matrices), key="ta_matrix",
                                 bind="query-params")
            matrix = matrices[which]
            st.altair_chart(sentence_matrix(matrix, f"{which}: rows cause, columns effect"))
            top_n = st.slider("Links per sentence in the graph", 0, 10, 3, key="ta_links",
                              bind="query-params")
            importance = np.abs(scores.get(metric, np.zeros(len(chunks))))
            st.altair_chart(link_graph(chunks, shared.service().top_links(matrix, top_n),
                                       importance, meta["tags"], TAG_COLORS))
        heads = (shared.service().array(parts["receivers"], "receiver_heads")
                 if parts.get("receivers") else [])
        if len(heads):
            kurtosis = shared.service().array(parts["receivers"], "kurtosis")
            st.markdown("**Receiver heads** (highest kurtosis of vertical attention)")
            st.dataframe([{"layer": int(l), "head": int(h), "kurtosis": float(kurtosis[l, h])}
                          for l, h in heads], hide_index=True, height=200)
            pick = st.selectbox("A receiver head's sentence attention",
                                [f"layer {l}, head {h}" for l, h in heads], key="ta_head",
                                bind="query-params")
            layer, head = (int(x.split()[-1]) for x in pick.split(","))
            blocks = shared.service().array(parts["receivers"], "sentence_attention")
            st.altair_chart(sentence_matrix(blocks[layer, head].astype(np.float32).T,
                                            f"{pick}: rows attended, columns attending"))
    if sentence is not None:
        st.subheader(f"Sentence {sentence}")
        st.text(chunks[sentence])
        alternatives = shared.service().resampled_alternatives(
            trace_id, parts.get("resampling"), sentence)
        if alternatives:
            st.markdown("**Most frequent resampled alternatives**")
            for text, count in alternatives:
                st.text(f"{count}×  {text}")
        if "accuracy" in scores and sentence + 1 < len(chunks):
            st.markdown(f"Accuracy of rollouts from here (with the sentence resampled): "
                        f"{scores['accuracy'][sentence]:.2f}; from the next sentence (kept): "
                        f"{scores['accuracy'][sentence + 1]:.2f}")
        for name, matrix in matrices.items():
            into = shared.service().strongest_links(matrix, sentence, "incoming", 5)
            out = shared.service().strongest_links(matrix, sentence, "outgoing", 5)
            st.markdown(f"**{name}** · affected by: {', '.join(f'{s} ({v:+.3f})' for s, v in into) or '—'}"
                        f" · affects: {', '.join(f'{t} ({v:+.3f})' for t, v in out) or '—'}")
    with st.expander("What these methods are"):
        st.markdown(EXPLANATION)
    with st.expander("Export and share", expanded=True):
        table = np.stack([scores[m] for m in scores], axis=1) if scores else np.zeros((len(chunks), 0))
        st.download_button("CSV of the sentence scores", lambda: export.matrix_csv(
            table, [f"{i}" for i in range(len(chunks))], list(scores)),
            file_name="thought_anchors.csv", mime="text/csv")
        st.download_button("The trace in the published format (zip of JSON files)",
                           lambda: shared.service().published_zip(
                               trace_id, parts.get("resampling"), scores,
                               next((m for n, m in matrices.items() if "Counterfactual" in n),
                                    None),
                               next((m for n, m in matrices.items() if "Suppression" in n),
                                    None)),
                           file_name="thought_anchors_trace.zip", mime="application/zip")
        shared.share_link({TRACE_PARAM: trace_id, **{
            key: st.session_state.get(key) for key in (
                "ta_metric", "ta_matrix", "ta_links", "ta_supp", "ta_resample", "ta_r",
                "ta_head")},
            "ta_s": None if sentence is None else f"{sentence}: {chunks[sentence][:60]}"})
