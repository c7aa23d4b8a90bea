"""Data sets, file loaders and minibatching for minidress.

Quick start::

    from minidress.data import load_dataset, iterate_minibatches
    ds = load_dataset("digits", seed=0)        # bundled, no download
    rng = np.random.default_rng(0)
    for xb, yb in iterate_minibatches(ds.x_train, ds.y_train, 64, rng=rng):
        ...
"""

from __future__ import annotations

from .batching import Normalizer, iterate_minibatches, standardize, train_val_split
from .cifar import load_cifar10, read_cifar_batch
from .datasets import Dataset, load_digits, make_moons, make_spirals, stratified_split
from .loaders import (
    REGISTRY,
    ChecksumError,
    DataError,
    DataNotFoundError,
    RemoteFile,
    data_home,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)

__all__ = [
    "Dataset", "load_digits", "make_spirals", "make_moons", "stratified_split",
    "load_mnist", "load_fashion_mnist", "load_cifar10", "read_idx", "read_cifar_batch", "data_home",
    "REGISTRY", "RemoteFile", "DataError", "ChecksumError", "DataNotFoundError",
    "iterate_minibatches", "standardize", "Normalizer", "train_val_split",
    "load_dataset", "DATASETS",
]

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


def load_dataset(name: str, data_dir=None, seed: int = 0, **kwargs) -> Dataset:
    """Load a data set by name.

    Parameters
    ----------
    name : {"digits", "mnist", "fashion_mnist", "cifar10"}
        "-" is accepted for "_" (e.g. "fashion-mnist").
    data_dir : path, optional
        Folder holding the files (ignored for "digits", which ships with
        scikit-learn). When given, it is the only folder searched unless
        ``download=True`` is passed too; otherwise the cache is used and
        missing files are downloaded.
    seed : int
        Seeds the train/test split of "digits"; the other data sets come
        with a fixed official split.
    **kwargs
        Passed to the file loaders, e.g. ``download=False`` or ``fetch=``.

    Returns
    -------
    Dataset

    Raises
    ------
    DataNotFoundError, ChecksumError, DataError
        From the file loaders; all are ValueErrors with one-line messages.
    """
    key = str(name).lower().replace("-", "_")
    if key == "digits":
        return load_digits(seed=seed)
    loaders = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}
    if key not in loaders:
        raise ValueError(f"load_dataset: unknown data set {name!r}; choose one of {list(DATASETS)}")
    return loaders[key](data_dir=data_dir, **kwargs)
