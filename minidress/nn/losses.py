"""Softmax cross-entropy, computed stably."""
from __future__ import annotations

import numpy as np


def log_softmax(logits):
    """Row-wise log-softmax of ``logits [N, C]``, shifted by the row maximum so ``exp`` never
    overflows."""
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of ``softmax(logits)`` against integer labels, and its gradient.

    Parameters
    ----------
    logits : ndarray [N, C], float32 or float64
    labels : ndarray [N], integers in [0, C)

    Returns
    -------
    loss : float (Python float, the mean over the batch)
    dlogits : ndarray [N, C], same dtype as logits: ``(softmax(logits) - onehot(labels)) / N``
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
    labels = np.asarray(labels)
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match logits {logits.shape}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}), got values in [{labels.min()}, {labels.max()}]")
    logp = log_softmax(logits)
    rows = np.arange(n)
    loss = -logp[rows, labels].mean()
    dlogits = np.exp(logp)
    dlogits[rows, labels] -= 1
    dlogits /= n
    return float(loss), dlogits
