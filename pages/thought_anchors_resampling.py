"""The Thought Anchors page's resampling panel: pick a configured rollout engine by name, see
the cost before starting and the rate while it runs, resample every sentence or only some, and
add rollouts to a finished analysis later. (Not a page itself: thought_anchors.py uses it.)"""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from pages import shared, view_requests
from pages.view_state import RESAMPLE_WHICH as WHICH

CHOSEN = "ta_chunks"  # the widget's key and the view state's field
PAPER = ("The paper used 100 rollouts per sentence at temperature 0.6 and top-p 0.95, each "
         "continuing to the answer (at most 16,384 new tokens).")


def _engine_defaults(engines: dict[str, dict]) -> None:
    """A new engine brings its own defaults (the paper's on a GPU or endpoint)."""
    engine = engines[st.session_state["ta_engine"]]
    st.session_state["ta_r"] = engine["default_rollouts"]
    st.session_state["ta_tokens"] = engine["default_max_new_tokens"]


def _add_rollouts(more: int) -> None:
    st.session_state["ta_r"] += more


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def chosen_sentences() -> str | None:
    """The sentences chosen for resampling as a link writes them ("3,7,12"), if any."""
    chosen = st.session_state.get(CHOSEN) if st.session_state.get("ta_which") == WHICH[3] \
        else None
    return ",".join(map(str, sorted(chosen))) if chosen else None


def _sentences(record, parts: dict, which: str, state) -> list[int] | None:
    """The sentence indices to resample (None: every sentence), or [] when none are chosen."""
    chunks = record.meta["chunks"]
    if which == WHICH[0]:
        return None
    if which == WHICH[3]:
        if CHOSEN not in st.session_state:  # the link's choice, once (then the user's)
            st.session_state[CHOSEN] = [i for i in state.ta_chunks or () if i < len(chunks)]
        return st.multiselect("Sentences to resample", range(len(chunks)), key=CHOSEN,
                              format_func=lambda i: f"{i}: {chunks[i][:50]}") or []
    source = parts.get("receivers" if which == WHICH[1] else "suppression")
    if not source:
        st.info("Turn on attention suppression above to see the sentences it flags.")
        return []
    count = st.slider("How many flagged sentences", 1, len(chunks), min(5, len(chunks)),
                      key="ta_flagged", bind="query-params")
    picked = shared.service().flagged_sentences(source, count)
    st.caption(f"Flagged: sentences {', '.join(map(str, picked))}.")
    return picked


def resampling_part(record, parts: dict, results) -> str | None:
    """The resampling analysis' id once it is ready (None while it runs or is off). The
    resampling of every sentence, or of the chosen ones, is the view's request for the state
    these controls set (`results`); the flagged sentences are picked from the white-box parts."""
    service = shared.service()
    engines = {e["name"]: e for e in service.rollout_engines()}
    st.markdown("**Counterfactual resampling**")
    c1, c2, c3 = st.columns([2, 1, 1])
    name = c1.selectbox("Rollout engine", list(engines), key="ta_engine", bind="query-params",
                        format_func=lambda n: engines[n]["label"], on_change=_engine_defaults,
                        args=(engines,), help="Engines are configured on the server.")
    engine = engines[name]
    rollouts = int(c2.number_input("Rollouts per sentence", 1, 10_000,
                                   engine["default_rollouts"], key="ta_r", bind="query-params"))
    tokens = int(c3.number_input("Longest rollout (new tokens)", 16, 16_384,
                                 engine["default_max_new_tokens"], key="ta_tokens",
                                 bind="query-params"))
    if engine["noisy"]:
        st.caption(f"{engine['label']} is slow, so the defaults are small "
                   f"({engine['default_rollouts']} rollouts per sentence, at most "
                   f"{engine['default_max_new_tokens']} new tokens): many rollouts stop before an "
                   f"answer and the metrics are noisy at this size. {PAPER}")
    else:
        st.caption(f"Defaults are the paper's: {PAPER}")
    which = st.segmented_control("Resample", WHICH, default=WHICH[0], key="ta_which",
                                 bind="query-params") or WHICH[0]
    chunks = _sentences(record, parts, which, results.state)
    if chunks == []:
        return None
    cost = service.resampling_estimate(record.id, name, rollouts, chunks, max_new_tokens=tokens)
    forced = cost.get("forced_to_sample", 0)
    text = (f"{rollouts:,} rollouts × {cost['sentences']} sentences = "
            f"{cost['rollouts_total']:,} rollouts"
            + (f" (+ {forced:,} short forced-answer ones)" if forced else ""))
    if cost["rollouts_saved"]:
        text += (f"; {cost['rollouts_saved']:,} of these {cost['rollouts_total']:,} saved "
                 f"already, {cost['rollouts_to_sample']:,} to sample")
    when = (f"about {_duration(cost['seconds'])} at the measured rate"
            if cost["seconds"] is not None else "the time is estimated once the engine has run")
    st.markdown(f"**Expected cost:** {text} · {when}")
    if not st.toggle("Run the resampling", key="ta_resample", bind="query-params",
                     help="Saved as each rollout finishes: a stopped job resumes."):
        return None
    label = f"Resampling on {engine['label']}"
    if which in (WHICH[0], WHICH[3]):
        done = results.for_state(replace(
            results.state, ta_resample=True, ta_engine=name, ta_r=rollouts, ta_tokens=tokens,
            ta_which=which, ta_chunks=chunks and tuple(sorted(chunks)))).get("ta_resampling",
                                                                               label)
    else:
        done = shared.derived(view_requests.resampling(record, engine, rollouts, tokens,
                                                       chunks), label)
    if done:
        st.button(f"Add {rollouts} more rollouts per sentence", on_click=_add_rollouts,
                  args=(rollouts,), help="Keeps the saved rollouts and samples only the new ones.")
    return done
