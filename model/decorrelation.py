"""A decorrelation term for training: keep every *other* attribute out of a task's embedding.

The triplet loss only asks that, under task ``t``, same-value images sit closer than other-value images by
a margin; how the images of one value are arranged is left free, and the shared features arrange them by
whatever else they see (hat, mouth, hair). Then a ``Smiling`` search returns smiling faces *with the
query's hat* (``model.evaluate`` measures this as leakage). This term penalises, within each value ``v`` of
``t``, the cross-covariance between the embeddings and every other attribute::

    C[t, v, a] = E[ e · (y_a - E[y_a | t = v])ᵀ  |  t = v ]          (D × values of a)
    loss = mean over groups (t, v) of  sum over a of ||C[t, v, a]||²

``y_a`` is attribute ``a``'s one-hot label; ``E[y_a | t = v]`` is taken from the training labels (exact
population means, given once), and ``||C||²`` is estimated without bias from the batch's pairs ``i != j``
of the same value: ``mean (e_i · e_j)(ỹ_i · ỹ_j)``. With batch means instead, a batch of a dozen images per
task would estimate mostly its own noise (measured: 0.44 of bias against a 0.007 signal). Per pair, the
gradient pulls together same-value images that differ in their other attributes and pushes apart those
that agree on them: hard positives, weighted by how much they differ. ``t``'s own column (and any column
that ``t``'s value fixes, as ``Bald`` fixes the hair colours) centres to zero and takes no part.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.data.base import UNKNOWN


def _one_hot(labels: Tensor, num_values: int) -> Tensor:
    """(..., A) int labels -> (..., A, V) float one-hot; unknown labels are all zeros."""
    known = (labels != UNKNOWN).unsqueeze(-1)
    return F.one_hot(labels.clamp(min=0), num_values).float() * known


def class_label_means(labels: np.ndarray) -> Tensor:
    """``labels`` (N, A) of the training images -> (A, V, A, V) float32: entry ``[t, v, a]`` is the mean
    one-hot of attribute ``a`` among images whose ``t`` is ``v`` (images with ``a`` unknown skipped)."""
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    num_values = max(int(y.max()) + 1, 2)
    onehot = _one_hot(y, num_values)  # (N, A, V)
    known = (y != UNKNOWN).float()  # (N, A)
    means = torch.zeros(y.shape[1], num_values, y.shape[1], num_values)
    for t in range(y.shape[1]):
        member = _one_hot(y[:, t], num_values)  # (N, V): the image's value of t
        counts = torch.einsum("nc,na->ca", member, known).clamp(min=1)  # (V, A)
        means[t] = torch.einsum("nc,nav->cav", member, onehot) / counts.unsqueeze(-1)
    return means


def decorrelation_loss(
    embeddings: Tensor, values: Tensor, labels: Tensor, tasks: Tensor, means: Tensor
) -> Tensor:
    """The term above for a batch laid out by task.

    ``embeddings`` (K, G, D): G images embedded under task ``tasks[k]`` (the column of ``labels`` it is);
    ``values`` (K, G) their labels under that task; ``labels`` (K, G, A) all their labels; ``means``
    ``class_label_means`` of the training labels. Images with an unknown task value take no part.
    """
    num_values = means.shape[-1]
    known = (labels != UNKNOWN).unsqueeze(-1)  # (K, G, A, 1)
    expected = means[tasks.unsqueeze(1), values.clamp(min=0)]  # (K, G, A, V)
    centred = (_one_hot(labels, num_values) - expected) * known  # (K, G, A, V)
    label_sim = torch.einsum("kgav,khav->kgh", centred, centred)  # (K, G, G), summed over attributes
    embedding_sim = torch.einsum("kgd,khd->kgh", embeddings, embeddings)  # (K, G, G)
    valid = values != UNKNOWN
    pairs = (values.unsqueeze(2) == values.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    pairs &= ~torch.eye(values.shape[1], dtype=torch.bool, device=values.device)  # i != j
    per_task = (embedding_sim * label_sim * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    return per_task.mean()


def ramped(weight: float, ramp: float, step: int, total_steps: int) -> float:
    """The term's weight at ``step``: rising linearly from 0 to ``weight`` over the first ``ramp`` of the
    ``total_steps``, then constant. Measured on the demo budget (docs/results.md, "Leakage"): at weight 3
    from the first step the tasks with fine cues (nose, eyebrows) lost up to 14 points of triplet
    accuracy; weight 4 ramped over the first half lost less (mean 0.929 against 0.918; 0.946 without the
    term) and leaked less — the tasks find their cue first, then the term clears the rest out."""
    if ramp <= 0:
        return weight
    return weight * min(1.0, step / (ramp * total_steps))
