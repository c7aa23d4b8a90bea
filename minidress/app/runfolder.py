"""A run folder that says what it holds: complete or not, whose run, and who is writing it.

``minidress train`` writes checkpoints, a store, metrics and plots into one folder. So that a run
is never lost, mixed with another or mistaken for a finished one:

* ``run.json`` records the run's configuration and ``"status"``: ``"incomplete"`` from the start,
  ``"complete"`` only after the last file is written (``eval`` and ``inspect`` say when a folder is
  incomplete);
* a folder that holds a run is never overwritten silently: ``--resume`` continues it (the
  configuration must be the same run's; a complete run resumed with more epochs trains on),
  ``--force`` clears its run files first, so an old run's metrics never sit beside a new run's
  checkpoint;
* ``run.lock`` (created exclusively, holding the writer's process id) keeps two runs from writing
  one folder at once; a lock whose process is gone is taken over;
* temporary files a killed run left behind (``.*.tmp`` of ``minidress.fileio.atomic_open``) are
  removed when the next run takes the folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..fileio import atomic_write_bytes

RUN_FILE, LOCK_FILE = "run.json", "run.lock"
# The files a run writes; ``--force`` removes exactly these (and nothing else of the user's).
RUN_FILES = ("run.json", "pretrain.npz", "checkpoint.npz", "store.npz", "metrics.json",
             "accuracy_vs_density.png", "curves.png")


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (in use, holds another run, nothing to resume)."""


def read_status(folder) -> dict | None:
    """The folder's ``run.json`` (``status``, ``config``), or None if it records no run."""
    path = Path(folder) / RUN_FILE
    if not path.exists():
        return None
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} is not a readable run record: {e}") from None
    if not isinstance(status, dict) or status.get("status") not in ("incomplete", "complete"):
        raise RunFolderError(f"{path} is not a run record (no status 'incomplete'/'complete')")
    return status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # it exists, owned by someone else
        return True
    return True


class RunFolder:
    """Take ``folder`` for a run described by ``config`` (a JSON-ready dict); use as a context
    manager. ``resume``: continue the incomplete run it holds; ``force``: replace what it holds.

    Raises ``RunFolderError`` (one line) when the folder is in use, holds a run and neither flag is
    given, or when ``resume`` finds nothing to continue or a different configuration.
    """

    def __init__(self, folder, config: dict, resume=False, force=False, identity=None):
        if resume and force:
            raise RunFolderError("--resume and --force exclude each other: continue the run, or replace it")
        self.path, self.config, self.resume, self.force = Path(folder), config, resume, force
        # The keys that make two configurations the same run (default: all of them).
        self.identity = identity

    def __enter__(self) -> "RunFolder":
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._check_and_clear()
            self._write("incomplete")
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc):
        self._unlock()
        return False

    def complete(self):
        """Record that every file of the run has been written."""
        self._write("complete")

    # -- helpers ------------------------------------------------------------------------------
    def _lock(self):
        lock = self.path / LOCK_FILE
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise RunFolderError(f"{self.path} is in use by process {pid} (its {LOCK_FILE}); "
                                         f"wait for it or choose another --out") from None
                lock.unlink(missing_ok=True)      # left by a run that was killed
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return
        raise RunFolderError(f"{self.path}: could not take {LOCK_FILE}")

    def _unlock(self):
        (self.path / LOCK_FILE).unlink(missing_ok=True)

    def _same_run(self, old: dict) -> list:
        keys = self.identity if self.identity is not None else set(old) | set(self.config)
        return sorted(k for k in keys if old.get(k) != self.config.get(k))

    def _check_and_clear(self):
        for tmp in self.path.glob(".*.tmp"):          # a killed run's half-written files
            tmp.unlink(missing_ok=True)
        status = read_status(self.path)
        held = status is not None or any((self.path / f).exists() for f in RUN_FILES)
        if self.resume:
            if status is None:
                raise RunFolderError(f"{self.path} records no run to resume (no {RUN_FILE})")
            differ = self._same_run(status.get("config", {}))
            if differ:
                old = status.get("config", {})
                raise RunFolderError(f"{self.path} holds another run: " + "; ".join(
                    f"{k} is {old.get(k)!r} there, {self.config.get(k)!r} here" for k in differ[:4]))
        elif held and not self.force:
            what = f"a {status['status']} run" if status else "files of a run"
            raise RunFolderError(f"{self.path} holds {what}: pass --resume to continue it or "
                                 f"--force to replace it, or choose another --out")
        elif held:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)

    def _write(self, status):
        record = {"status": status, "config": self.config}
        atomic_write_bytes(self.path / RUN_FILE, json.dumps(record, indent=2).encode())
