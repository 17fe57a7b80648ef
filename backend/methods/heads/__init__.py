"""Head importance and head roles (spec: specs/head_importance.md).

gates       the gate xi[layer, head] on each head's output (a pre-hook on the output projection)
losses      the losses importance is measured with (LM next-token loss, sentence similarity)
importance  gradient, ablation and attention-statistic importance, normalisation
roles       per-head role scores from attention maps (previous-token, sink, induction...)
pruning     the pruning curve (loss against the fraction of heads masked)
"""

from backend.methods.heads.gates import (OUTPUT_PROJECTIONS, attention_output_projections,
                                         gate_shape, head_gates)
from backend.methods.heads.importance import (METHODS, ablation_deltas, gate_gradients,
                                              head_importance, loss_under_gates,
                                              normalize_importance, raw_importance,
                                              single_head_ablations)
from backend.methods.heads.losses import (LossFn, SentenceSimilarity, next_token_loss,
                                          sentence_similarity_loss)
from backend.methods.heads.pruning import PruningCurve, pruning_curve
from backend.methods.heads.roles import (attention_confidence, attention_entropy,
                                         first_token_scores, head_roles, induction_scores,
                                         induction_scores_from_attention, locality_scores,
                                         previous_token_scores, receiver_kurtosis, self_scores,
                                         vertical_scores)

__all__ = [
    "METHODS", "OUTPUT_PROJECTIONS", "LossFn", "PruningCurve", "SentenceSimilarity",
    "ablation_deltas", "attention_confidence", "attention_entropy", "attention_output_projections",
    "first_token_scores", "gate_gradients", "gate_shape", "head_gates", "head_importance",
    "head_roles", "induction_scores", "induction_scores_from_attention", "locality_scores",
    "loss_under_gates", "next_token_loss", "normalize_importance", "previous_token_scores",
    "pruning_curve", "raw_importance", "receiver_kurtosis", "self_scores",
    "sentence_similarity_loss", "single_head_ablations", "vertical_scores",
]
