"""Small, crash-safe file helpers shared by the data loaders and checkpoints.

A file written with these helpers is either the complete new version or
the untouched old one: we write to a temporary file in the *same* directory
(so the final rename never crosses a file system), fsync it, and then
``os.replace`` it onto the target, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

_CHUNK = 1 << 20  # 1 MiB: large enough to be fast, small enough to stream big files


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort (not possible on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)          # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` only if the block succeeds.

    Parameters
    ----------
    path : str or os.PathLike
        Final destination. Missing parent directories are created.
    mode : str, default "wb"
        A write mode: "wb"/"w" (or with "+"). Append and read-only modes are
        rejected because the temporary file always starts empty.

    Yields
    ------
    file object
        Writable file on the temporary path. On a clean exit it is flushed,
        fsynced and renamed onto ``path``; on an exception it is deleted and
        ``path`` is left as it was.

    Examples
    --------
    >>> with atomic_open("weights.npz") as f:          # doctest: +SKIP
    ...     np.savez(f, w=np.zeros(3))
    """
    if not isinstance(mode, str) or not mode.startswith("w"):
        raise ValueError(f"atomic_open: mode must be a write mode like 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # BaseException so that KeyboardInterrupt also cleans up the temp file.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (all or nothing).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; parent directories are created.
    data : bytes-like
        Complete new contents.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes: data must be bytes, got {type(data).__name__}")
    with atomic_open(path, "wb") as f:
        f.write(data)


def save_figure(fig, path: PathLike, dpi: int = 110) -> None:
    """Lay out a matplotlib figure, write it to ``path`` as PNG atomically, and close it."""
    import matplotlib.pyplot as plt    # heavy: only when a figure is saved
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
