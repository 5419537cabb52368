"""Classification losses: cross-entropy and focal loss, both with label smoothing and class weights.

Focal loss (Lin et al. 2017) scales each class's log-likelihood by `(1 - p_c) ** gamma`, so confident, easy
examples contribute little and training time goes to the hard ones. Combined with label smoothing it is taken over
the smoothed target distribution `q` (torch's `cross_entropy(label_smoothing=eps)` convention: `1 - eps` on the label
plus `eps / C` on every class):

    FL = -sum_c q_c * alpha_c * (1 - p_c) ** gamma * log p_c

so `gamma=0` with no `alpha` is exactly torch's label-smoothed cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "focal")


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: Literal["cross_entropy", "focal"] = "cross_entropy",
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mean loss over the batch for `logits` (N, C) and integer `labels` (N,).

    `alpha` (focal only) weights class c's term inside the sum; `class_weights` weights each sample by its label's
    weight and takes the weighted mean `sum w_i l_i / sum w_i`, which is what torch's `cross_entropy(weight=)` does.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got '{loss}'")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, num_classes), got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (batch,) = ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    num_classes = logits.shape[1]
    weight = _per_class(class_weights, num_classes, "class_weights", logits.device)

    if loss == "cross_entropy":
        if alpha is not None:
            raise ValueError("alpha is the focal loss's class weighting; with loss='cross_entropy' use class_weights")
        weight = None if weight is None else weight.to(logits.dtype)
        return F.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing)

    # float32 whatever the logits' dtype: log-probabilities of rare classes underflow in bf16.
    log_p = F.log_softmax(logits.float(), dim=-1)
    target = F.one_hot(labels, num_classes).to(log_p.dtype) * (1.0 - label_smoothing) + label_smoothing / num_classes
    # gamma=0 skips the power: d/dx x**0 at x=0 is 0 * inf in autograd, and the factor is 1 anyway.
    modulating = (1.0 - log_p.exp()).pow(gamma) if gamma != 0 else 1.0
    per_class = target * modulating * log_p
    alpha_t = _per_class(alpha, num_classes, "alpha", logits.device)
    if alpha_t is not None:
        per_class = per_class * alpha_t
    per_sample = -per_class.sum(dim=-1)
    if weight is None:
        return per_sample.mean()
    sample_weight = weight[labels]
    return (per_sample * sample_weight).sum() / sample_weight.sum()


def balanced_class_weights(counts: Sequence[int]) -> list[float]:
    """`n / (C * count_c)` per class (scikit-learn's "balanced"): every class then carries the same total weight."""
    if len(counts) == 0:
        raise ValueError("counts is empty; give one count per class")
    if any(c <= 0 for c in counts):
        raise ValueError(f"every class needs a positive count to be weighted, got {list(counts)}")
    total = sum(counts)
    return [total / (len(counts) * c) for c in counts]


def _per_class(values: Sequence[float] | None, num_classes: int, name: str,
               device: torch.device) -> torch.Tensor | None:
    if values is None:
        return None
    if len(values) != num_classes:
        raise ValueError(f"{name} has {len(values)} entries but the logits have {num_classes} classes; "
                         "give one value per class, in label-id order")
    return torch.as_tensor(list(values), dtype=torch.float32, device=device)
