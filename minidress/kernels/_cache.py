"""Keep Numba's on-disk cache of these kernels in step with their sources.

Numba checks a cached function against the modification time and size of *its own* source file
only. A kernel compiled into another (``program._product`` calls ``serving.im2col``) keeps the
old callee after the callee's file changes: an edited ``serving.py`` left the interpreter running
a stale ``im2col``, 4x slower than the new one, until the cache was deleted by hand. So at import
we hash every source file of this package and, when the hash differs from the one recorded beside
the cache, delete the cache files of this package (``__pycache__/*.nbi``, ``*.nbc``): the next call
recompiles everything once. The BLAS that compiled products call (``blas.BACKEND``) counts as
a source too. An installed, read-only copy never changes, and any error here (a
read-only directory) is ignored, since it can only cost a recompilation.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..fileio import atomic_write_bytes
from .blas import BACKEND      # no kernel in it is compiled or loaded at import

HERE = Path(__file__).resolve().parent
STAMP = HERE / "__pycache__" / "minidress-kernel-sources.sha256"


def sources_digest(directory: Path = HERE) -> bytes:
    """sha256 over the names and bytes of every ``*.py`` in ``directory``, in sorted order, and
    the BLAS that compiled products call (``blas.BACKEND``: the code differs between the two)."""
    digest = hashlib.sha256(BACKEND.encode() + b"\0")
    for path in sorted(directory.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest().encode()


def drop_stale_caches(directory: Path = HERE) -> bool:
    """Delete the Numba cache files in ``directory/__pycache__`` if the sources changed since
    they were recorded; returns whether it deleted anything."""
    stamp = directory / "__pycache__" / STAMP.name
    try:
        digest = sources_digest(directory)
        if stamp.exists() and stamp.read_bytes() == digest:
            return False
        stale = [p for p in stamp.parent.glob("*.nb[ic]")] if stamp.parent.exists() else []
        for path in stale:
            path.unlink(missing_ok=True)
        stamp.parent.mkdir(exist_ok=True)
        atomic_write_bytes(stamp, digest)
        return bool(stale)
    except OSError:
        return False


drop_stale_caches()
