"""Thought Anchors (Bogdan et al., arXiv 2506.19143): which sentences of a reasoning trace matter.

Pure parts of the three methods: segmentation, answers, sentence embeddings, resampling metrics
(black box), receiver heads and attention suppression (white box), and the published file format.
The sampler and the forward passes that feed them live elsewhere.
"""

from .resampling import trajectory_stats
from .segmentation import split_into_chunks

__all__ = ["split_into_chunks", "trajectory_stats"]
