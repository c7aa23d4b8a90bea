"""Minibatches, train/validation splits and input standardisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import numpy as np

from .datasets import _check_seed

SeedLike = Union[int, np.random.Generator]


def _check_xy(x, y, who: str) -> None:
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError(f"{who}: x and y must be numpy arrays, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{who}: x and y need a leading sample axis, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{who}: x has {len(x)} samples but y has {len(y)}; they must match")
    if len(x) == 0:  # an empty epoch would silently train on nothing (and divide by zero later)
        raise ValueError(f"{who}: x and y have no samples (shapes {x.shape} and {y.shape}); "
                         f"expected at least 1")
    _check_finite(x, f"{who}: x")


def _check_finite(x: np.ndarray, name: str) -> None:
    # ints cannot hold NaN/inf, so only floating arrays need the full scan
    if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} contains {bad} NaN/inf values; clean the data before training")


def iterate_minibatches(x: np.ndarray, y: np.ndarray, batch_size: int,
                        rng: Optional[SeedLike] = None, shuffle: bool = True,
                        drop_last: bool = False) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield one epoch of ``(xb, yb)`` minibatches.

    Parameters
    ----------
    x : np.ndarray, shape [N, ...]
        ``N >= 1``: empty data is rejected with a ValueError.
    y : np.ndarray, shape [N, ...]
    batch_size : int >= 1
    rng : numpy.random.Generator or int, optional
        Source of the shuffle order. Required when ``shuffle=True`` so that
        every run is reproducible; an int is used as a seed. Passing the same
        Generator to successive epochs gives a fresh order each epoch.
    shuffle : bool
        Visit samples in a random order (otherwise in stored order).
    drop_last : bool
        Skip the final batch if it has fewer than ``batch_size`` samples.

    Yields
    ------
    xb : np.ndarray, shape [B, ...], same dtype as x
    yb : np.ndarray, shape [B, ...], same dtype as y
        ``B == batch_size`` except possibly for the last batch.
    """
    _check_xy(x, y, "iterate_minibatches")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"iterate_minibatches: batch_size must be an int >= 1, got {batch_size!r}")
    n = len(x)
    if shuffle:
        if rng is None:
            raise ValueError("iterate_minibatches: shuffle=True needs rng (a numpy.random.Generator "
                             "or an int seed) so the order is reproducible; or pass shuffle=False")
        order = _check_seed(rng, "rng").permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if shuffle:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
        else:  # plain slices are views: no copy
            yield x[start:start + batch_size], y[start:start + batch_size]


def train_val_split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: SeedLike = 0):
    """Randomly hold out ``val_fraction`` of the samples for validation.

    Parameters
    ----------
    x : np.ndarray, shape [N, ...]
    y : np.ndarray, shape [N, ...]
    val_fraction : float in (0, 1)
        ``round(val_fraction * N)`` samples go to validation (at least 1,
        and at least 1 stays in training).
    seed : int or numpy.random.Generator

    Returns
    -------
    x_train, y_train, x_val, y_val : np.ndarray
        Row subsets of x and y, each keeping the original relative order.
    """
    _check_xy(x, y, "train_val_split")
    if not isinstance(val_fraction, (float, int)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction must be in (0, 1), got {val_fraction!r}")
    n = len(x)
    if n < 2:
        raise ValueError(f"train_val_split: need at least 2 samples, got {n}")
    n_val = min(max(int(round(val_fraction * n)), 1), n - 1)
    perm = _check_seed(seed).permutation(n)
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return x[train], y[train], x[val], y[val]


@dataclass(frozen=True, eq=False)
class Normalizer:
    """Per-channel (images) or per-feature (tables) mean/std standardisation.

    Attributes
    ----------
    mean, std : np.ndarray, float64
        Broadcastable against the data: shape [1, C, 1, 1] for [N, C, H, W]
        input, [1, F] for [N, F] input. ``std`` is floored at ``eps`` so
        constant channels map to 0 instead of NaN.
    """

    mean: np.ndarray
    std: np.ndarray

    @staticmethod
    def _reduce_axes(x: np.ndarray):
        if x.ndim < 2:
            raise ValueError(f"Normalizer: expected x of shape [N, F] or [N, C, ...], got {x.shape}")
        return (0,) + tuple(range(2, x.ndim))  # keep axis 1: features or channels

    @classmethod
    def fit(cls, x: np.ndarray, eps: float = 1e-8) -> "Normalizer":
        """Statistics of ``x`` (float, [N, F] or [N, C, ...]), computed in float64."""
        _check_float(x, "Normalizer.fit: x")
        if len(x) == 0:
            raise ValueError("Normalizer.fit: x has no samples")
        axes = cls._reduce_axes(x)
        mean = x.mean(axis=axes, dtype=np.float64, keepdims=True)
        std = x.std(axis=axes, dtype=np.float64, keepdims=True)
        return cls(mean, np.maximum(std, eps))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` in x's own dtype (float32 stays float32)."""
        _check_float(x, "Normalizer: x")
        self._reduce_axes(x)
        if x.shape[1:2] != self.mean.shape[1:2] or x.ndim != self.mean.ndim:
            raise ValueError(
                f"Normalizer: x has shape {x.shape} but the statistics have shape {self.mean.shape}")
        # cast the stats down rather than the data up: no float64 copy of a big array;
        # re-floor std because eps may round to 0 in a narrow dtype such as float16
        std = np.maximum(self.std.astype(x.dtype), np.finfo(x.dtype).tiny)
        return (x - self.mean.astype(x.dtype)) / std

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Undo :meth:`__call__`, again in x's dtype."""
        _check_float(x, "Normalizer.inverse: x")
        return x * self.std.astype(x.dtype) + self.mean.astype(x.dtype)


def _check_float(x, name: str) -> None:
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"{name} must be a floating numpy array, got {got}; "
                        f"convert first, e.g. x.astype(np.float32) / 255")
    _check_finite(x, name)


def standardize(x_train: np.ndarray, *others: np.ndarray, mean=None, std=None, eps: float = 1e-8):
    """Standardise ``x_train`` and any further arrays with the train statistics.

    Parameters
    ----------
    x_train : np.ndarray, float, shape [N, F] or [N, C, H, W]
        Statistics are per feature for 2-D input, per channel (over N, H, W)
        for image input.
    *others : np.ndarray
        e.g. validation and test inputs; normalised with the *train* stats
        so no information leaks from them.
    mean, std : array-like, optional
        Precomputed statistics (broadcastable, e.g. from an earlier call);
        give both or neither.
    eps : float
        Floor for std.

    Returns
    -------
    arrays : tuple of np.ndarray
        ``(x_train_n, *others_n)``, each in its input dtype.
    stats : Normalizer
        Holds ``mean`` and ``std`` (float64) for reuse or inversion.

    Examples
    --------
    >>> (xtr, xte), stats = standardize(ds.x_train, ds.x_test)   # doctest: +SKIP
    """
    if (mean is None) != (std is None):
        raise ValueError("standardize: give both mean and std, or neither")
    if mean is None:
        stats = Normalizer.fit(x_train, eps)
    else:
        _check_float(x_train, "standardize: x_train")
        Normalizer._reduce_axes(x_train)
        c = x_train.shape[1]
        shape = (1, c) + (1,) * (x_train.ndim - 2)
        try:  # accept a scalar, C values, or the [1, C, 1, 1] arrays of an earlier Normalizer
            m = np.broadcast_to(np.asarray(mean, np.float64).reshape(-1), (c,)).reshape(shape)
            s = np.broadcast_to(np.asarray(std, np.float64).reshape(-1), (c,)).reshape(shape)
            stats = Normalizer(m, np.maximum(s, eps))
        except ValueError as e:
            raise ValueError(f"standardize: mean/std must have {x_train.shape[1]} entries "
                             f"(one per channel/feature), got shapes {np.shape(mean)} and "
                             f"{np.shape(std)}") from e
    return tuple(stats(a) for a in (x_train,) + others), stats
