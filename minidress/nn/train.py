"""The training loop: ``fit``, ``evaluate`` and the plain (dense) training step.

Reproducibility: the batches of epoch ``e`` are shuffled by ``numpy.random.default_rng([seed, e])``,
so an epoch's order depends only on the seed and the epoch number. Resuming from the checkpoint
written at the end of epoch ``e`` therefore continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import sys
import time

import numpy as np
from tqdm import tqdm  # the plain bar: tqdm.auto warns in notebooks without ipywidgets

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.batching import iterate_minibatches
from ..kernels.conv_train import TRAINING_THREADS, training_threads
from .layers import eval_mode
from ..validate import check_int
from .losses import softmax_cross_entropy


class StepCounter:
    """A training step counter kept in ``model.buffers[counter]`` (so a checkpoint restores it
    and a resumed run draws what the uninterrupted one would); for classes with a ``model``."""

    counter = "step"

    def _start_counter(self):
        self.model.buffers.setdefault(self.counter, np.zeros((), np.int64))

    @property
    def steps_done(self) -> int:
        """Training steps taken so far (restored by loading a checkpoint)."""
        return int(self.model.buffers[self.counter])

    def _advance(self) -> int:
        """The current step number; the counter moves on by one."""
        t = self.steps_done
        self.model.buffers[self.counter][...] = t + 1
        return t


def dense_step(model, xb, yb):
    """One forward and backward pass of the whole (dense) model.

    Returns
    -------
    loss : float
    n_correct : int
    grads : dict[str, ndarray]   (names as in ``model.parameters()``)
    """
    logits = model.forward(xb)
    loss, dlogits = softmax_cross_entropy(logits, yb)
    model.backward(dlogits, input_grad=False)
    return loss, int((logits.argmax(axis=1) == yb).sum()), model.gradients()


def predict_logits(model, x, batch_size=1000):
    """Logits ``[N, n_classes]`` in eval mode (running BatchNorm statistics); restores the mode."""
    with eval_mode(model):
        return np.concatenate([model.forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(model, x, y, batch_size=1000):
    """Mean cross-entropy loss and accuracy (fraction in [0, 1]) of ``model`` on ``(x, y)``."""
    logits = predict_logits(model, x, batch_size)
    loss, _ = softmax_cross_entropy(logits, y)
    return loss, float((logits.argmax(axis=1) == y).mean())


def steps_per_epoch(n_examples, batch_size) -> int:
    """Mini-batches in one epoch of ``n_examples``: the last one may be smaller."""
    return -(-n_examples // batch_size)


# A loss this many times the first step's has diverged: stop, rather than train to the end on
# nonsense (lr=1e6 used to finish with a loss of 1e6).
DIVERGENCE_FACTOR = 1000.0
# Configuration keys that may change when a run is resumed (more epochs, another output
# folder, ...); everything else that identifies the run must match the checkpoint's.
RESUMABLE_CHANGES = frozenset({"epochs", "out", "resume", "force", "quiet", "data_dir", "history"})


def fit(model, optimizer, x_train, y_train, x_val=None, y_val=None, *, epochs, batch_size=128,
        schedule=None, seed=0, step=dense_step, quiet=False, checkpoint_path=None, resume=None,
        meta=None, label="", threads=TRAINING_THREADS):
    """Train ``model`` with ``optimizer`` for ``epochs`` epochs of shuffled mini-batches.

    Parameters
    ----------
    model : minidress.nn.layers.Layer
    optimizer : object with ``step(params, grads)``, ``lr``, ``state_dict()``/``load_state_dict()``
    x_train : ndarray [N, ...];  y_train : int ndarray [N]
    x_val, y_val : optional held-out data evaluated after every epoch
    epochs : int
        Total number of epochs (a resumed run counts the epochs already done).
    schedule : callable ``step -> lr`` over optimizer steps, or None to keep ``optimizer.lr``
    step : callable ``(model, xb, yb) -> (loss, n_correct, grads)``; ``dense_step`` by default,
        ``minidress.dress.joint_step`` for DRESS
    quiet : bool
        No progress bar and no epoch lines (the bar is also off when stderr is not a terminal).
    checkpoint_path : path, optional
        Written atomically after every epoch (model, optimizer, history, ``meta``).
    resume : path, optional
        A checkpoint of this same run to continue from; its model spec, data set, seed and
        configuration must match ``meta`` (``RESUMABLE_CHANGES`` aside), or it is refused.
    meta : dict, optional
        Extra JSON metadata stored in checkpoints (e.g. how to rebuild the model).
    threads : int or None
        Threads of BLAS and of the Numba pool while training (``conv_train.training_threads``;
        1 by default, the only setting that stays fast on a shared 2-core machine; None leaves
        both pools as they are). Results do not depend on it.

    Returns
    -------
    history : list of dict, one per epoch: ``epoch, lr, train_loss, train_acc, val_loss, val_acc,
        seconds``. ``lr`` is the rate of the epoch's last step; ``train_loss``/``train_acc``
        average over the epoch's batches as they were trained (train mode).

    Raises
    ------
    FloatingPointError
        When the loss becomes NaN or infinite, or ``DIVERGENCE_FACTOR`` times the first step's;
        the message names the epoch and step.
    """
    check_int(epochs, "epochs", 0)
    check_int(batch_size, "batch_size", 1)
    if len(x_train) == 0 or len(x_train) != len(y_train):
        raise ValueError(f"x_train and y_train must hold the same number (>= 1) of examples, "
                         f"got {len(x_train)} and {len(y_train)}")
    history, start, first_loss = [], 0, None
    if resume is not None:
        saved = load_checkpoint(resume, model, optimizer, expect_meta={**(meta or {}), "seed": seed},
                                may_differ=RESUMABLE_CHANGES)
        history = saved["history"]
        start = len(history)
    with training_threads(threads, threads):
        per_epoch = steps_per_epoch(len(x_train), batch_size)
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            model.train()
            rng = np.random.default_rng([seed, epoch])
            total_loss = total_correct = seen = 0
            name = f"{label}, epoch {epoch + 1}/{epochs}" if label else f"epoch {epoch + 1}/{epochs}"
            bar = tqdm(iterate_minibatches(x_train, y_train, batch_size, rng), total=per_epoch,
                       desc=name, disable=quiet or not sys.stderr.isatty(), leave=False)
            for i, (xb, yb) in enumerate(bar):
                global_step = epoch * per_epoch + i
                if schedule is not None:
                    optimizer.lr = schedule(global_step)
                loss, correct, grads = step(model, xb, yb)
                first_loss = loss if first_loss is None else first_loss
                if not np.isfinite(loss) or abs(loss) > DIVERGENCE_FACTOR * max(abs(first_loss), 1.0):
                    raise FloatingPointError(
                        f"loss became {loss:.4g} at epoch {epoch + 1}, step {i + 1} (global step "
                        f"{global_step}), {first_loss:.4g} at the first step: training diverged; lower "
                        f"the learning rate or check the data for NaN")
                optimizer.step(model.parameters(), grads)
                total_loss += loss * len(yb)
                total_correct += correct
                seen += len(yb)
                if not quiet and i % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}")
            record = {"epoch": epoch + 1, "lr": float(optimizer.lr),
                      "train_loss": total_loss / seen, "train_acc": total_correct / seen}
            if x_val is not None:
                record["val_loss"], record["val_acc"] = evaluate(model, x_val, y_val)
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            if not quiet:
                val = f", val acc {record['val_acc']:.4f}" if x_val is not None else ""
                tqdm.write(f"{name}: loss {record['train_loss']:.4f}, "
                           f"train acc {record['train_acc']:.4f}{val} ({record['seconds']:.1f} s)")
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, model, optimizer,
                                {**(meta or {}), "history": history, "seed": seed})
    return history
