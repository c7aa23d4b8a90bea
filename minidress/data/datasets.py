"""In-memory data sets: scikit-learn's 8x8 digits and two 2-D toy problems.

Everything here is small enough to build in milliseconds, needs no files
or network, and is fully determined by ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is elementwise, not a bool
class Dataset:
    """A labelled train/test split held in memory.

    Attributes
    ----------
    name : str
        Short identifier, e.g. "digits" or "mnist".
    x_train : np.ndarray, float32, shape [N_train, ...]
        Training inputs, e.g. [N, C, H, W] images in [0, 1].
    y_train : np.ndarray, int64, shape [N_train]
        Training labels in ``range(n_classes)``.
    x_test : np.ndarray, float32, shape [N_test, ...]
    y_test : np.ndarray, int64, shape [N_test]
    n_classes : int
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(
                    f"Dataset {self.name!r}: x_{split} has {len(x)} rows but y_{split} has {len(y)}"
                )

    def summary(self) -> str:
        """One line per split with shape, dtype, value range and class counts."""
        lines = [f"Dataset {self.name!r} ({self.n_classes} classes)"]
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            counts = np.bincount(y, minlength=self.n_classes) if len(y) else np.zeros(0, int)
            rng = f"[{x.min():.3g}, {x.max():.3g}]" if x.size else "[]"
            lines.append(
                f"  {split:5s}: x {tuple(x.shape)} {x.dtype} in {rng}, "
                f"y {tuple(y.shape)} {y.dtype}, per class {counts.tolist()}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, x_train={tuple(self.x_train.shape)}, "
            f"x_test={tuple(self.x_test.shape)}, n_classes={self.n_classes})"
        )


def _check_seed(seed, arg="seed") -> np.random.Generator:
    """Turn an int seed or a Generator into a Generator; reject anything else."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    raise TypeError(f"{arg} must be an int or numpy.random.Generator, got {seed!r}")


def stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """Split row indices so that every class keeps the same test fraction.

    Parameters
    ----------
    y : np.ndarray, int, shape [N]
        Class labels.
    test_fraction : float in (0, 1)
    rng : np.random.Generator

    Returns
    -------
    train_idx, test_idx : np.ndarray, int64, shapes [N - K] and [K]
        Sorted, disjoint, together a permutation of ``range(N)``. Class c
        contributes ``round(test_fraction * n_c)`` rows to the test side.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    y = np.asarray(y)
    test = []
    for c in np.unique(y):  # sorted classes, so the rng is consumed in a fixed order
        idx = np.flatnonzero(y == c)
        n_test = int(round(test_fraction * len(idx)))
        test.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits with a stratified split.

    Parameters
    ----------
    seed : int
        Seeds the split; the same seed always gives the same split.
    test_fraction : float in (0, 1)
        Fraction of each class moved to the test set.

    Returns
    -------
    Dataset
        ``x_*`` float32 [N, 1, 8, 8] in [0, 1] (raw pixel counts 0..16 divided
        by 16), ``y_*`` int64 [N], ``n_classes=10``. 1797 images in total.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # lazy: sklearn is slow to import

    rng = _check_seed(seed)
    raw = _sk_load_digits()
    x = (raw.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = raw.target.astype(np.int64)
    tr, te = stratified_split(y, test_fraction, rng)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], n_classes=10)


def _split_counts(n_samples: int, n_parts: int) -> list[int]:
    """Spread n_samples over n_parts as evenly as possible (first parts get the remainder)."""
    base, extra = divmod(n_samples, n_parts)
    return [base + (i < extra) for i in range(n_parts)]


def _check_common(n_samples, noise, min_samples):
    if not isinstance(n_samples, (int, np.integer)) or isinstance(n_samples, bool) or n_samples < min_samples:
        raise ValueError(f"n_samples must be an int >= {min_samples}, got {n_samples!r}")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")


def make_spirals(n_samples: int = 600, n_classes: int = 3, noise: float = 0.2, seed: int = 0):
    """Interleaved 2-D spirals, one arm per class (the CS231n toy problem).

    Each arm sweeps radius 0 -> 1 over 4 radians of angle; ``noise`` is the
    standard deviation of Gaussian jitter added to the angle, so the classes
    are not linearly separable.

    Parameters
    ----------
    n_samples : int
        Total points, split as evenly as possible over the classes.
    n_classes : int >= 2
    noise : float >= 0
    seed : int

    Returns
    -------
    x : np.ndarray, float32, shape [n_samples, 2]
    y : np.ndarray, int64, shape [n_samples]
        Rows are shuffled, so classes are interleaved.
    """
    if not isinstance(n_classes, (int, np.integer)) or isinstance(n_classes, bool) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    _check_common(n_samples, noise, min_samples=n_classes)  # at least one point per arm
    rng = _check_seed(seed)
    xs, ys = [], []
    for c, n in enumerate(_split_counts(n_samples, n_classes)):
        r = np.linspace(0.0, 1.0, n)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, n) + rng.normal(0.0, noise, size=n)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(n, c, dtype=np.int64))
    perm = rng.permutation(n_samples)
    return np.concatenate(xs)[perm].astype(np.float32), np.concatenate(ys)[perm]


def make_moons(n_samples: int = 600, noise: float = 0.1, seed: int = 0):
    """Two interleaving half circles (same geometry as scikit-learn's make_moons).

    Parameters
    ----------
    n_samples : int >= 2
        Total points; the upper moon (class 0) gets the extra one if odd.
    noise : float >= 0
        Standard deviation of Gaussian noise added to both coordinates.
    seed : int

    Returns
    -------
    x : np.ndarray, float32, shape [n_samples, 2]
    y : np.ndarray, int64, shape [n_samples]
        Rows are shuffled.
    """
    _check_common(n_samples, noise, min_samples=2)
    rng = _check_seed(seed)
    n_upper, n_lower = _split_counts(n_samples, 2)
    t_up = np.linspace(0.0, np.pi, n_upper)
    t_lo = np.linspace(0.0, np.pi, n_lower)
    upper = np.stack([np.cos(t_up), np.sin(t_up)], axis=1)
    lower = np.stack([1.0 - np.cos(t_lo), 0.5 - np.sin(t_lo)], axis=1)  # shifted, flipped copy
    x = np.concatenate([upper, lower]) + rng.normal(0.0, noise, size=(n_samples, 2))
    y = np.concatenate([np.zeros(n_upper, np.int64), np.ones(n_lower, np.int64)])
    perm = rng.permutation(n_samples)
    return x[perm].astype(np.float32), y[perm]
