"""Rollout engines: many sampled continuations of prompts, for resampling and trace generation.

`base` defines the interface (Prompt, SamplingParams, Continuation, RolloutEngine); `embedded`
runs in-process (static KV cache, continuous batching, CUDA graphs); `endpoint` talks to an
OpenAI-compatible /v1/completions server that the operator configured (`registry`).
"""

from backend.rollouts.base import (AnswerStop, Continuation, EngineError, Prompt, RolloutEngine,
                                   RolloutMeter, SamplingParams, degenerate)

__all__ = ["AnswerStop", "Continuation", "EngineError", "Prompt", "RolloutEngine",
           "RolloutMeter", "SamplingParams", "degenerate"]
