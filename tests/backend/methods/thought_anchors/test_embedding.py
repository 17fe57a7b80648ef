from concurrent.futures import ThreadPoolExecutor

import numpy as np

from backend.methods.thought_anchors import embedding
from backend.methods.thought_anchors.embedding import SentenceEmbedder

SENTENCES = [
    "So, the coefficient of a^2b^2 is 120.",
    "The coefficient of a squared b squared is 120.",
    "Hmm, let me try to figure this out step by step.",
    "Wait, I think I made a mistake in the binomial expansion of (c + 1/c)^6 here, let me redo it.",
]


def test_unit_rows_and_meaningful_similarity(embedder):
    e = embedder.embed(SENTENCES)
    assert e.shape == (4, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.8 > sim[0, 2]  # a paraphrase is close, another step is not
    assert embedder.embed([]).shape == (0, 384)


def test_batching_and_padding_do_not_change_embeddings(embedder):
    batched = SentenceEmbedder(batch_size=3).embed(SENTENCES[::-1])[::-1]
    one_by_one = np.concatenate([embedder.embed([s]) for s in SENTENCES])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_threads_share_one_model(embedder):
    expected = embedder.embed(SENTENCES)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: SentenceEmbedder().embed(SENTENCES), range(8)))
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-5)
    assert list(embedding._LOADED) == [embedder.model_dir]
