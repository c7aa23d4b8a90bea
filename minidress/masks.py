"""Magnitude masks: row-based (DRESS), and layer-wise, global and structured ones for ablations.

Vocabulary follows ``torch.nn.utils.prune``: a mask is a 0/1 array of the weight's shape that
the forward pass multiplies in; the weight itself is never edited. ``importance_scores`` (default
``|weight|``) rank the entries; ``density`` is the kept fraction in (0, 1] (``amount`` in torch's
words is the pruned fraction, ``1 - density``).

A *row* is one output unit over its whole fan-in: row ``r`` of ``weight.reshape(rows, -1)``,
which is ``[out, in]`` for Linear and ``[C_out, C_in*kh*kw]`` for Conv2d.

Rules every implementation must share to reproduce the same masks
-----------------------------------------------------------------
* Kept entries per row: ``n = max(1, floor(density * row_len + 0.5))``, i.e. round half up
  (not Python's round-half-to-even), with a floor of one so that no output unit goes dead.
* Ranking: by decreasing importance; among equal importances the lower column index ranks first
  (a stable sort of ``-importance``).
"""
from __future__ import annotations

import math

import numpy as np


def check_density(density, name="density") -> float:
    """Return ``density`` as a float, or raise naming the argument if it is not in (0, 1], or is
    a bool, a string or a float16/float32 number (whose row counts can differ)."""
    # bool and str convert to float (True -> 1.0, "0.5" -> 0.5) but are never meant as densities.
    if isinstance(density, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name} must be a number in (0, 1], got {density!r}")
    # The row count is evaluated in double: a float32 density keeps another count for 749
    # (density, row length) pairs (docs/golden-format.md), so it is refused, never widened.
    if getattr(density, "dtype", None) in (np.float16, np.float32):
        raise TypeError(f"{name} must be a Python float or float64, got {density!r} of dtype {density.dtype}")
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0, 1], got {density!r}") from None
    if not (0.0 < d <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1] (the kept fraction), got {density!r}")
    return d


def n_kept(density, row_len: int) -> int:
    """Entries kept per row at ``density``: ``max(1, floor(density * row_len + 0.5))``."""
    return max(1, math.floor(check_density(density) * row_len + 0.5))


def _rows(weight, importance_scores):
    w = np.asarray(weight)
    if w.ndim < 2:
        raise ValueError(f"weight must have at least 2 dimensions (rows first), got shape {w.shape}")
    scores = np.abs(w) if importance_scores is None else np.asarray(importance_scores)
    if scores.shape != w.shape:
        raise ValueError(f"importance_scores must have the weight's shape {w.shape}, got {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("importance_scores (or the weight) contain NaN; ranks would be arbitrary")
    return scores.reshape(w.shape[0], -1)


def row_ranks_reference(weight, importance_scores=None) -> np.ndarray:
    """``row_ranks`` as the rule states it: a stable sort of ``-importance`` per row."""
    return _inverse_permutations(_stable_order(_rows(weight, importance_scores)))


def row_ranks(weight, importance_scores=None) -> np.ndarray:
    """Rank of every entry within its row: 0 for the most important.

    Parameters
    ----------
    weight : ndarray [rows, ...]  (Linear ``[out, in]`` or Conv ``[C_out, C_in, kh, kw]``)
    importance_scores : ndarray, weight's shape, optional (default ``|weight|``)

    Returns
    -------
    ranks : int32 ndarray [rows, row_len]
        Each row is a permutation of ``0..row_len-1``. Ties: lower column index first.

    Notes
    -----
    For float32 scores the rows are sorted as 64-bit integer keys, the score's order-preserving
    bit pattern above the column index: every key is distinct, so any sort gives the order of
    the stable sort (``row_ranks_reference``; equal bit for bit, ``tests/test_masks.py``; 2.6-3.2x
    faster, ``benchmarks/bench_switch.py`` section 2). Other dtypes take the reference.
    """
    s = _rows(weight, importance_scores)
    return _inverse_permutations(_distinct_keys_order(s) if s.dtype == np.float32 else _stable_order(s))


def _distinct_keys_order(scores):
    """``_stable_order`` of float32 ``scores [rows, n]`` by one sort of distinct 64-bit keys."""
    bits = np.add(scores, np.float32(0)).view(np.uint32)    # + 0: -0.0 becomes 0.0, its equal
    # Order-preserving map of float32 bits to unsigned integers (flip the sign bit of a
    # positive number, every bit of a negative one), complemented: most important first.
    # In place, as the rest: on a virtual machine each fresh page costs microseconds.
    flip = bits >> np.uint32(31)
    flip *= np.uint32(0x7FFFFFFF)
    flip |= np.uint32(0x80000000)
    bits ^= flip
    keys = np.invert(bits, out=bits).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= np.arange(scores.shape[1], dtype=np.uint64)    # below the score: ties by column
    keys.sort(axis=1)
    keys &= np.uint64(0xFFFFFFFF)                            # the columns, in rank order
    return keys.view(np.int64)


def _stable_order(scores):
    """Columns of every row of ``scores [rows, n]``, most important first, ties in column order:
    the stable sort of ``-scores``, computed as a stable ascending sort of each reversed row,
    reversed, so that no score is negated (``-`` wraps unsigned and the most negative integers)."""
    return scores.shape[1] - 1 - np.argsort(scores[:, ::-1], axis=1, kind="stable")[:, ::-1]


def _inverse_permutations(order):
    """``ranks[r, order[r, j]] = j``: the rank of every column, from the columns in rank order."""
    ranks = np.empty(order.shape, np.int32)
    ranks[np.arange(order.shape[0])[:, None], order] = np.arange(order.shape[1], dtype=np.int32)
    return ranks


def row_topk_mask(weight, density, importance_scores=None) -> np.ndarray:
    """Keep the ``n_kept(density, row_len)`` most important entries of every row.

    Returns
    -------
    mask : bool ndarray, weight's shape; every row has exactly the same number of True entries.
    """
    ranks = row_ranks(weight, importance_scores)
    return (ranks < n_kept(density, ranks.shape[1])).reshape(np.shape(weight))


def nearest_level(levels, density) -> int:
    """Index of the trained level nearest to ``density`` (ties: the denser level). A density
    between trained levels uses that level's batch-norm slot, in training and when deployed."""
    return min(range(len(levels)), key=lambda i: (abs(levels[i] - density), -levels[i]))


# ---------------------------------------------------------------------------------------------
# Other granularities, for ablations. Same vocabulary; only the set of entries that compete
# for the kept slots changes.
# ---------------------------------------------------------------------------------------------

def _top_fraction(scores, density):
    """Bool array of ``scores``' shape keeping the ``max(1, round-half-up(density*size))`` largest,
    ties to the lower flat index."""
    flat = scores.ravel()
    k = n_kept(density, flat.size)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(scores.shape)


def layerwise_topk_mask(weight, density, importance_scores=None) -> np.ndarray:
    """Unstructured top-k over the whole layer (as LCS uses): rows may keep very different counts."""
    s = _rows(weight, importance_scores)
    return _top_fraction(s, density).reshape(np.shape(weight))


def global_topk_masks(weights: dict, density, importance_scores: dict | None = None) -> dict:
    """Unstructured top-k over all given layers together: one magnitude threshold network-wide.

    Layers are concatenated in the order of ``weights`` (ties go to the earlier layer, then the
    lower flat index).
    """
    names = list(weights)
    scores = [(_rows(weights[n], None if importance_scores is None else importance_scores[n])).ravel()
              for n in names]
    keep = _top_fraction(np.concatenate(scores), density)
    out, start = {}, 0
    for n, s in zip(names, scores):
        out[n] = keep[start:start + s.size].reshape(np.shape(weights[n]))
        start += s.size
    return out


def structured_row_mask(weight, density, importance_scores=None) -> np.ndarray:
    """Keep whole rows (output units) with the largest L1 norm of importance; prune the rest."""
    s = _rows(weight, importance_scores)
    keep_rows = _top_fraction(s.sum(axis=1), density)
    return np.broadcast_to(keep_rows[:, None], s.shape).reshape(np.shape(weight)).copy()
