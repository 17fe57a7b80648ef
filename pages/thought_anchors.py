"""Thought Anchors: which sentences of a reasoning trace matter (Bogdan et al., 2025)."""

from dataclasses import replace

import numpy as np
import streamlit as st

from backend.analyses.thought_anchors import METRICS, REASONING_EXAMPLE, WORKED_EXAMPLE
from backend.local_reductions import strongest_links, top_links
from backend.service import AtlasError
from pages import shared, view_requests
from pages.thought_anchors_resampling import chosen_sentences, resampling_part
from pages.view_requests import thought_anchors as requests
from pages.view_state import IMPORT_SOURCE, PUBLISHED_SOURCE, TRACE_SOURCES as SOURCES
from viz import export
from viz.math_text import math_markdown
from viz.thought_anchors import (TAG_COLORS, link_graph, sentence_list, sentence_matrix,
                                 tag_legend)

TRACE_PARAM = "t"
PENDING = "ta_pending"  # the trace being written or split for this session
PUBLISHED_NOTE = """A real reasoning trace: DeepSeek-R1-Distill-Qwen-14B solving a MATH problem,
with the authors' own results (100 rollouts per sentence, suppression matrix, LLM-labelled
tags), from Bogdan, Macar, Nanda & Conmy (2025), shipped with the app under the MIT licence."""
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


def _start(source: str, model: str, problem: str, answer: str, trace: str) -> None:
    """Remember what the user asked to open: its jobs finish over several reruns."""
    st.session_state[PENDING] = {"source": source, "model": model, "problem": problem,
                                 "answer": answer, "trace": trace}


def _open_pending(source: str) -> None:
    """Carry the started trace through its jobs (generation, then splitting: each finishing job
    reruns the page) and open it when ready, so one click is enough."""
    pending = st.session_state.get(PENDING)
    if not pending or pending["source"] != source:
        st.session_state.pop(PENDING, None)
        return
    model = pending["model"]
    labels = {"ta_generate": f"{model} writes a solution", "ta_trace": "Splitting the trace"}
    for request in view_requests.trace(model, pending["problem"], pending["answer"],
                                       pending["trace"], shared.service()):
        trace = shared.derived(request, labels[request.kind])
        if not trace:
            return
    del st.session_state[PENDING]
    st.query_params[TRACE_PARAM] = trace


def choose_trace() -> None:
    """Pick or create a trace; sets the `t` query parameter when one is ready."""
    source = st.segmented_control("Trace", SOURCES, default=SOURCES[0], key="ta_source",
                                  bind="query-params") or SOURCES[0]
    model = st.session_state.get("model_choice", "smollm2")
    model = st.session_state.get("other_model", "") if model == "other" else model
    opened = st.query_params.get(TRACE_PARAM)
    if source == PUBLISHED_SOURCE:
        st.markdown(PUBLISHED_NOTE)
        example = shared.service().published_example()
        if opened != example and (not opened or st.button("Open the published example")):
            st.query_params[TRACE_PARAM] = example
        return
    if source == IMPORT_SOURCE:
        files = st.file_uploader("The trace's JSON files (problem.json, base_solution.json, "
                                 "chunks_labeled.json, chunks_resampled.json, "
                                 "step_importance*.json)", type="json",
                                 accept_multiple_files=True)
        label = st.text_input("Label (e.g. the model that wrote it)", "published trace")
        if files and st.button("Import"):
            try:
                trace = shared.service().import_published_trace(
                    {f.name: f.getvalue() for f in files}, label)
            except AtlasError as e:
                st.error(str(e))
                return
            st.query_params[TRACE_PARAM] = trace
        return
    if source == WORKED_EXAMPLE:
        problem, answer = REASONING_EXAMPLE["problem"], REASONING_EXAMPLE["answer"]
        st.markdown(f"**Problem:** {math_markdown(problem)}  \n**Reference answer:** "
                    f"{shared.plain(answer)}  \nThe model chosen in the sidebar writes its own "
                    "solution (a small model may not reason well: see the published example).")
        # A trace from a link stays open until the user asks for the model's own.
        if not opened or st.button("Let the model write its own trace"):
            _start(source, model, problem, answer, "")
    else:
        problem = st.text_area("Problem", key="ta_problem")
        answer = st.text_input("Reference answer (optional)", key="ta_answer")
        own = st.text_area("Your trace (optional: leave empty to let the model write one)",
                           key="ta_own")
        if st.button("Analyse this problem"):
            if not (problem.strip() or own.strip()):
                st.error("Enter a problem (and, if you have one, its trace).")
                return
            _start(source, model, problem, answer, own)
    _open_pending(source)


AGREEMENT = {True: " (they agree)", False: " (they differ)", None: ""}


def _answer(answer: str | None) -> str:
    """An answer for markdown: LaTeX ones as math, the rest as typed."""
    if not answer:
        return "none"
    latex = set(answer) & set("\\^_{}")
    return math_markdown(f"\\({answer}\\)") if latex else shared.plain(answer)


def own_trace_parts(record, results) -> dict[str, str | None]:
    """Run (or fetch) the white-box passes and, on request, the resampling of an own trace."""
    suppression = st.toggle("Attention suppression", key="ta_supp", bind="query-params",
                            help="One forward pass per sentence.")
    results = results.for_state(replace(results.state, t=record.id, ta_supp=suppression,
                                        ta_resample=False))
    parts = {"receivers": results.get("ta_receivers", "Receiver heads")}
    if suppression:
        parts["suppression"] = results.get("ta_suppression", "Attention suppression")
    with st.container(border=True):
        parts["resampling"] = resampling_part(record, parts, results)
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


def trace_view(trace_id: str, record, results) -> None:
    """The trace's sentences coloured by a score, its sentence matrices, its receiver heads,
    one sentence in detail, and the downloads."""
    meta, chunks = record.meta, record.meta["chunks"]
    model_label = meta.get("model_label", record.model)
    st.markdown(f"**Problem:** {math_markdown(meta['problem'])}")
    answers = shared.service().trace_answers(trace_id)
    st.markdown(f"**Answer in the trace:** {_answer(answers['trace'])} · **Reference answer:** "
                f"{_answer(answers['reference'])}{AGREEMENT[answers['matches']]} · "
                f"**model:** {shared.plain(model_label)} · "
                f"**{len(chunks)} sentences** · tags: {meta['tags_source']}")
    if record.kind == "ta_trace" and (answers["degenerate"] or not answers["trace"]):
        why = ("stopped writing because it kept repeating itself" if answers["degenerate"]
               else "gave no \\\\boxed\\{\\} answer")
        st.warning(f"{shared.plain(model_label)} {why}: it is probably too small to reason "
                   "through this problem (the paper's traces come from 8B and 14B reasoning "
                   "models). The scores below describe its text, not its reasoning: open the "
                   "published example to see real anchors.")
    parts = {} if record.kind == "ta_published" else own_trace_parts(record, results)
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
        # Our HTML only: sentence_list makes every sentence inert but for its math.
        st.markdown(sentence_list(chunks, scores.get(metric), meta["tags"], TAG_COLORS, sentence),
                    unsafe_allow_html=True)
    with right:
        if matrices:
            which = st.selectbox("Sentence × sentence matrix", list(matrices), key="ta_matrix",
                                 bind="query-params")
            matrix = matrices[which]
            st.altair_chart(sentence_matrix(matrix, f"{which}: rows cause, columns effect"))
            top_n = st.slider("Links per sentence in the graph", 0, 10, 3, key="ta_links",
                              bind="query-params")
            importance = np.abs(scores.get(metric, np.zeros(len(chunks))))
            st.altair_chart(link_graph(chunks, top_links(matrix, top_n),
                                       importance, meta["tags"], TAG_COLORS), width="content")
            st.html(tag_legend(TAG_COLORS))
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
        st.markdown(math_markdown(chunks[sentence]))
        alternatives = shared.service().resampled_alternatives(
            trace_id, parts.get("resampling"), sentence)
        if alternatives:
            st.markdown("**Most frequent resampled alternatives**")
            for text, count in alternatives:
                st.markdown(f"{count}× {math_markdown(text)}")
        if "accuracy" in scores and sentence + 1 < len(chunks):
            st.markdown(f"Accuracy of rollouts from here (with the sentence resampled): "
                        f"{scores['accuracy'][sentence]:.2f}; from the next sentence (kept): "
                        f"{scores['accuracy'][sentence + 1]:.2f}")
        for name, matrix in matrices.items():
            into = strongest_links(matrix, sentence, "incoming", 5)
            out = strongest_links(matrix, sentence, "outgoing", 5)
            st.markdown(f"**{name}** · affected by: {', '.join(f'{s} ({v:+.3f})' for s, v in into) or '—'}"
                        f" · affects: {', '.join(f'{t} ({v:+.3f})' for t, v in out) or '—'}")
    with st.expander("What these methods are"):
        st.markdown(EXPLANATION)
    with st.expander("Export and share", expanded=True):
        table = np.stack([scores[m] for m in scores], axis=1) if scores else np.zeros((len(chunks), 0))
        st.download_button("CSV of the sentence scores", lambda: export.matrix_csv(
            table, [f"{i}" for i in range(len(chunks))], list(scores), corner="sentence"),
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
                "ta_head", "ta_engine", "ta_tokens", "ta_which", "ta_flagged")},
            "ta_chunks": chosen_sentences(),
            "ta_s": None if sentence is None else f"{sentence}: {chunks[sentence][:60]}"})


def render(results, state) -> None:
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
        trace_view(trace_id, record, results)


if __name__ == "__main__":
    shared.show("thought_anchors", requests, render)
