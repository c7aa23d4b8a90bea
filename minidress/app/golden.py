"""Golden vectors: every tensor of a few DRESS steps, for cross-checking other implementations.

``write_golden(path)`` runs each named case of ``CASES`` (a tiny network, its batch and its
DRESS settings, each built to exercise one rule the others do not) and stores every input,
weight, rank, mask, logit, loss, gradient and statistic in a versioned archive
(``minidress.checkpoint`` format, kind ``minidress.golden``). ``check_golden(path)`` checks a file
that minidress or another implementation wrote: it regenerates the case's inputs from the seed
(so a file whose inputs or weights were edited fails), recomputes everything from the file's
inputs, and reports the largest difference per tensor with the first mismatching entries, as
llm.c's ``check_tensor`` does. ``docs/golden-format.md`` documents each array.

Format 2 holds the cases of ``CASES``; format 1 (the ``mlp`` and ``cnn`` cases, one step, no
``step/0/`` in the names) is still written on request and checked.
"""
from __future__ import annotations

import json
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..checkpoint import _digest, read_archive, write_archive
from ..dress import Dress, DressOptions
from ..masks import n_kept
from ..nn.layers import ReLU
from ..nn.models import build_model

GOLDEN_KIND = "minidress.golden"
GOLDEN_VERSION = 2
READ_VERSIONS = (1, 2)
V1_CASES = ("mlp", "cnn")
F64_TOL = 1e-10
# Measured: PyTorch float32 (examples/torch_reference.py) against minidress float32 over the
# 10-step trajectory, largest absolute difference 4.8e-7 (losses, logits, gradients, weights and
# statistics of magnitude up to 4.3); the tolerance leaves a factor of 20.
F32_TOL = 1e-5
INPUT_PREFIXES = ("x", "y", "param/", "buffer/")


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

def _seq(*layers) -> tuple:
    """Layer specs (``minidress.nn.models.build_model``) named by position, as ``Sequential``
    names its children."""
    return tuple({"name": str(i), **layer} for i, layer in enumerate(layers))


def _linear(n_in, n_out):
    return {"type": "linear", "in": n_in, "out": n_out}


def _conv(c_in, c_out, k, stride, padding):
    return {"type": "conv2d", "in_channels": c_in, "out_channels": c_out, "kernel_size": k,
            "stride": stride, "padding": padding}


def _batchnorm(features):
    return {"type": "batchnorm", "num_features": features, "momentum": 0.1, "eps": 1e-5}


def _maxpool(k, stride):
    return {"type": "maxpool2d", "kernel_size": k, "stride": stride}


RELU, FLATTEN = {"type": "relu"}, {"type": "flatten"}


def _plant_ties(dress, x, rng):
    """In every row of every sparsified weight, give the weights ranked ``n - 1`` and ``n``
    (0-based) the same magnitude at each level's cut ``n`` (each keeps its sign), so that only
    the tie rule (lower column first) decides which one a level keeps."""
    for layer in dress.layers.values():
        w = layer.params["weight"].reshape(len(layer.params["weight"]), -1)      # a view
        rows = np.arange(len(w))
        for d in dress.levels:
            n = n_kept(d, w.shape[1])
            if n < w.shape[1]:
                order = np.argsort(-np.abs(w), axis=1, kind="stable")
                a, b = order[:, n - 1], order[:, n]
                w[rows, b] = np.sign(w[rows, b]) * np.abs(w[rows, a])


def _dyadic(a, bits):
    """Round ``a`` in place to a multiple of ``2**-bits``: sums of a few such products are then
    exact in float64, whatever the order of the additions, so planted zeros and ties are exact."""
    a[...] = np.round(a * 2.0 ** bits) / 2.0 ** bits


def _plant_relu_zeros(dress, x, rng):
    """Make pre-activations exactly 0 at every ReLU: integer inputs, weights on a 2**-16 grid,
    and, for each level k, the biases of units 2k and 2k+1 set so that sample ``unit % N``
    enters the ReLU at exactly 0 in that level's sub-network."""
    model = dress.model
    x[...] = rng.integers(-3, 4, x.shape)
    for p in model.parameters().values():
        _dyadic(p, 16)
    dress.rank()
    for i, layer in enumerate(model.layers[:-1]):
        if not isinstance(model.layers[i + 1], ReLU):
            continue
        for k, d in enumerate(dress.levels):
            dress.use(d, level=k)
            for unit in (2 * k, 2 * k + 1):
                h = x
                for before in model.layers[:i + 1]:
                    h = before.forward(h)
                layer.params["bias"][unit] -= h[unit % len(x), unit]


def _plant_batchnorm(dress, x, rng):
    """Per-level affine parameters and running statistics that differ from slot to slot (and
    from the defaults), so that every slot's use and update is checked."""
    for bn in dress.batchnorms:
        shape = bn.params["weight"].shape
        bn.params["weight"][...] = 1 + 0.2 * rng.standard_normal(shape)
        bn.params["bias"][...] = 0.2 * rng.standard_normal(shape)
        bn.buffers["running_mean"][...] = 0.5 * rng.standard_normal(shape)
        bn.buffers["running_var"][...] = rng.uniform(0.5, 2.0, shape)


def _receptive_centre(conv, i, j, hw):
    """Input pixel at the centre of output position ``(i, j)``'s receptive field, or None if it
    lies in the padding."""
    r, c = (v * conv.stride - conv.padding + conv.kernel_size // 2 for v in (i, j))
    return (r, c) if 0 <= r < hw[0] and 0 <= c < hw[1] else None


def _plant_pool_ties(dress, x, rng):
    """Exact ties of the maximum inside max-pool windows of the dense level, one per sample.

    Inputs on a 1/4 grid, conv weights ``j/64`` (distinct magnitudes per row) with a centre tap
    of +-1 on input channel 0, biases on a 1/64 grid: every conv output is exact. For a window
    whose maximum ``v1`` is positive, the input pixel at the centre of another position's field
    (outside the maximum's field) moves by ``(v1 - v2) / centre tap``, which lifts that position
    to exactly ``v1``; a plant that does not leave the window tied is undone and the next tried.
    """
    conv, pool = dress.model.layers[0], dress.model.layers[1]
    x[...] = rng.integers(-8, 9, x.shape) / 4
    w, centre = conv.params["weight"], conv.kernel_size // 2
    for c in range(len(w)):
        mags = rng.choice(np.arange(1, 64), size=w[c].size, replace=False) / 64
        w[c] = (mags * rng.choice([-1.0, 1.0], w[c].size)).reshape(w[c].shape)
        w[c, 0, centre, centre] = rng.choice([-1.0, 1.0])
    conv.params["bias"][...] = rng.integers(-16, 17, len(w)) / 64
    dress.rank()
    dress.use(1.0, level=0)
    for n in range(len(x)):
        if not _tie_one_window(conv, pool, x, n, c=n % len(w)):
            raise RuntimeError(f"conv_pool: found no pooling window of sample {n} to tie")


def _tie_one_window(conv, pool, x, n, c) -> bool:
    """Plant one tie in a pooling window of sample ``n``, channel ``c`` (see ``_plant_pool_ties``)."""
    k, s, centre = pool.k, pool.stride, conv.kernel_size // 2
    tap = conv.params["weight"][c, 0, centre, centre]
    out = conv.forward(x)[n, c]
    for i in range(0, out.shape[0] - k + 1, s):
        for j in range(0, out.shape[1] - k + 1, s):
            window = out[i:i + k, j:j + k]
            v1 = window.max()
            for flat in np.argsort(-window, axis=None, kind="stable")[1:] if v1 > 0 else ():
                pi, pj = np.unravel_index(flat, window.shape)
                pixel = _receptive_centre(conv, i + pi, j + pj, x.shape[2:])
                if pixel is None:
                    continue
                saved = x[n, 0][pixel]
                x[n, 0][pixel] += (v1 - window[pi, pj]) / tap
                tied = conv.forward(x)[n, c, i:i + k, j:j + k]
                if tied.max() == v1 and np.count_nonzero(tied == v1) >= 2:
                    return True
                x[n, 0][pixel] = saved
    return False


@dataclass(frozen=True)
class Case:
    """One golden case: a network, its batch, its DRESS settings and what it exercises.

    Every Linear and Conv2d is sparsified (``dense_first_last=False``); batch norms get one slot
    per level (``norm="per_level"``). ``plant(dress, x, rng)`` gives the case its feature after
    the random initialisation (it may edit weights, statistics and ``x`` in place).
    ``inputs_of`` names a case whose inputs these are, cast to ``dtype``.
    """
    name: str
    exercises: str
    layers: tuple
    input_shape: tuple
    n_classes: int = 4
    levels: tuple = (1.0, 0.5, 0.25)
    lambdas: str = "density"
    lr: float = 0.1
    steps: int = 1
    resample_every: int = 0
    dtype: str = "float64"
    tolerance: float = F64_TOL
    plant: Callable | None = field(default=None, compare=False)
    inputs_of: str | None = None

    def meta(self) -> dict:
        """The case as ``__meta__["cases"][name]`` documents it."""
        return {"exercises": self.exercises, "layers": list(self.layers),
                "input_shape": list(self.input_shape), "n_classes": self.n_classes,
                "levels": list(self.levels), "lambdas": self.lambdas, "lr": self.lr,
                "steps": self.steps, "resample_every": self.resample_every, "dtype": self.dtype,
                "tolerance": self.tolerance, "norm": "per_level", "sparsified": "every linear and conv2d"}


_TRAJECTORY = _seq(_linear(12, 10), _batchnorm(10), RELU, _linear(10, 8), RELU, _linear(8, 4))
# The position of a case is its identity: it seeds the case's inputs (default_rng([seed, index])),
# so new cases go at the end. mlp and cnn are format 1's networks with format 1's inputs.
CASES = (
    Case("mlp", "format 1's MLP: three sparsified Linear layers, one step",
         _seq(_linear(12, 10), RELU, _linear(10, 8), RELU, _linear(8, 4)), (7, 12)),
    Case("cnn", "format 1's CNN: two convs (stride 1 and 2, padding 1), C-order flatten of (C, H, W)",
         _seq(_conv(2, 3, 3, 1, 1), RELU, _conv(3, 4, 3, 2, 1), RELU, FLATTEN, _linear(36, 4)),
         (5, 2, 6, 6)),
    Case("ties", "equal magnitudes straddle every level's cut in every row: the lower column is kept",
         _seq(_linear(8, 8), RELU, _linear(8, 4)), (6, 8), plant=_plant_ties),
    Case("counts", "row counts: halves round up (0.5 x 5 keeps 3, 0.05 x 50 keeps 3), the floor of "
                   "one (0.05 x 5 keeps 1), double arithmetic (0.29 x 50 keeps 14, not 15)",
         _seq(_linear(50, 5), RELU, _linear(5, 4)), (8, 50), levels=(1.0, 0.5, 0.29, 0.05)),
    Case("relu_zero", "pre-activations exactly 0 at both ReLUs in every level: no gradient passes "
                      "at 0", _seq(_linear(4, 6), RELU, _linear(6, 5), RELU, _linear(5, 3)), (6, 4),
         n_classes=3, levels=(1.0, 0.5), plant=_plant_relu_zeros),
    Case("batchnorm", "per-level batch norm (2-D after a conv, 1-D after a Linear) in training "
                      "mode: batch statistics, running update with the unbiased variance",
         _seq(_conv(2, 3, 3, 1, 1), _batchnorm(3), RELU, FLATTEN, _linear(48, 6), _batchnorm(6),
              RELU, _linear(6, 4)), (6, 2, 4, 4), plant=_plant_batchnorm),
    Case("conv_pool", "a conv with stride 2 and padding 2 on a non-square input, an overlapping "
                      "max-pool (k=2, s=1) with exact ties: the first maximum in row-major order",
         _seq(_conv(2, 3, 3, 2, 2), _maxpool(2, 1), RELU, FLATTEN, _linear(36, 4)), (4, 2, 8, 6),
         plant=_plant_pool_ties),
    Case("resample", "re-ranking from the current weights at the start of step 2 (resample_every=2)",
         _seq(_linear(10, 8), RELU, _linear(8, 4)), (8, 10), lr=0.5, steps=4, resample_every=2),
    Case("trajectory", "10 joint steps of plain SGD on one batch, with batch norm",
         _TRAJECTORY, (16, 12), steps=10, plant=_plant_batchnorm),
    Case("trajectory_f32", "the trajectory in float32, from the float64 inputs rounded to float32",
         _TRAJECTORY, (16, 12), steps=10, dtype="float32", tolerance=F32_TOL,
         inputs_of="trajectory"),
)
CASE_NAMES = tuple(c.name for c in CASES)


def get_case(name) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise ValueError(f"case must be one of {', '.join(CASE_NAMES)}; got {name!r}")


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------

def _dress(case, model) -> Dress:
    # Every option is pinned to the plain DRESS step the format documents, whatever the library's
    # defaults are (a changed default must never change the golden file).
    return Dress(model, DressOptions(levels=case.levels, lambdas=case.lambdas, resample_every=case.resample_every,
                                     resample_until=0, ramp="none", norm="per_level",
                                     dense_first_last=False, kernel_max_density=0.0,
                                     sample_prob=0.0, distill="none", densest_weight="scheme"))


def _running_stats(model) -> dict:
    return {k: v for k, v in model.state().items() if k.endswith(("running_mean", "running_var"))}


def case_inputs(case: Case, seed=0) -> dict:
    """The case's inputs, regenerated from ``seed``.

    Returns
    -------
    dict: ``x`` (``case.input_shape``, ``case.dtype``), ``y`` (``[N]`` int64), ``param/P`` (each
    parameter, batch norms ``[K, F]``) and ``buffer/B`` (running statistics ``[K, F]``), the
    same arrays, bit for bit, for the same seed.
    """
    if case.inputs_of is not None:
        source = case_inputs(get_case(case.inputs_of), seed)
        return {k: v if k == "y" else v.astype(case.dtype) for k, v in source.items()}
    rng = np.random.default_rng([seed, CASE_NAMES.index(case.name)])
    model = build_model({"layers": list(case.layers)}, dtype=np.float64, rng=rng)
    for name, p in model.parameters().items():
        if name.endswith("bias"):      # non-zero biases, so that their gradients mean something
            p[...] = rng.standard_normal(p.shape) * 0.1
    x = rng.standard_normal(case.input_shape)
    y = rng.integers(0, case.n_classes, case.input_shape[0])
    dress = _dress(case, model)
    if case.plant is not None:
        case.plant(dress, x, rng)
    return {"x": x, "y": y, **{f"param/{k}": v.copy() for k, v in model.parameters().items()},
            **{f"buffer/{k}": v.copy() for k, v in _running_stats(model).items()}}


def _require_like(given, like, name):
    """``given``, which must have ``like``'s dtype and shape (one input of a case)."""
    if given is None or np.shape(given) != like.shape or given.dtype != like.dtype:
        got = "missing" if given is None else f"{given.dtype} of shape {given.shape}"
        raise ValueError(f"{name} must be {like.dtype} of shape {like.shape}, got {got}")
    return given


def _load_inputs(model, inputs, where):
    for prefix, arrays in (("param/", model.parameters()), ("buffer/", _running_stats(model))):
        for name, a in arrays.items():
            a[...] = _require_like(inputs.get(prefix + name), a, f"{where}{prefix}{name}")


@contextmanager
def _recorded_outputs(model):
    """Record every output of ``model.forward`` within the block: the joint step's K passes,
    each level's logits in training mode (batch statistics), exactly as the step saw them."""
    outputs, forward = [], model.forward
    model.forward = lambda x: outputs.append(forward(x)) or outputs[-1]
    try:
        yield outputs
    finally:
        del model.forward


def reranks_at(case: Case, t: int) -> bool:
    """Whether step ``t`` ranks every row first: step 0, and every ``resample_every`` steps."""
    return t == 0 or bool(case.resample_every and t % case.resample_every == 0)


def run_case(case: Case, inputs: dict, where="") -> dict:
    """Run ``case`` from ``inputs`` (as ``case_inputs`` returns them).

    Parameters
    ----------
    case : Case
    inputs : dict of the case's inputs; their dtypes and shapes must be the case's
    where : prefix of the message naming an input of the wrong dtype or shape

    Returns
    -------
    dict name -> ndarray, names relative to the case (docs/golden-format.md, "Arrays"): the
    inputs, ``levels [K]``, ``lambdas [K]``, per step ``t`` the ``step/t/...`` tensors, and the
    final ``param_after/P``.
    """
    model = build_model({"layers": list(case.layers)}, dtype=np.dtype(case.dtype))
    dress = _dress(case, model)
    _load_inputs(model, inputs, where)
    dress.rank()
    x, y = inputs["x"], inputs["y"]
    out = {**inputs, "levels": np.array(dress.levels), "lambdas": dress.lambdas.copy()}
    lr = np.dtype(case.dtype).type(case.lr)
    for t in range(case.steps):
        s = f"step/{t}/"
        with _recorded_outputs(model) as logits:
            total, _, grads = dress.joint_step(model, x, y)
        if len(logits) != len(dress.levels):
            raise RuntimeError(f"the joint step ran {len(logits)} passes, expected one per level")
        if reranks_at(case, t):          # the ranks in use from this step on, and their masks
            out.update({f"{s}ranks/{n}": layer.buffers["ranks"].copy() for n, layer in dress.layers.items()})
            for k, d in enumerate(dress.levels):
                dress.use(d, level=k)
                out.update({f"{s}mask/{k}/{n}": layer.mask.astype(np.uint8) for n, layer in dress.layers.items()})
        out.update({f"{s}logits/{k}": z for k, z in enumerate(logits)})
        out[f"{s}loss"], out[f"{s}total_loss"] = dress.last_losses.copy(), np.array(total)
        params = model.parameters()
        for name, g in grads.items():
            out[f"{s}grad/{name}"] = g
            params[name] -= lr * g                       # plain SGD: no momentum, no weight decay
        out.update({f"{s}buffer_after/{n}": v.copy() for n, v in _running_stats(model).items()})
    out.update({f"param_after/{n}": v.copy() for n, v in model.parameters().items()})
    return out


def _v1_names(tensors: dict) -> dict:
    """Format 1's names: one step, without the ``step/0/`` prefix."""
    return {k.removeprefix("step/0/"): v for k, v in tensors.items()}


def inputs_digest(inputs: dict) -> str:
    """sha256 of a case's inputs (names relative to the case), with the recipe of the file's
    ``__sha256__``."""
    return _digest({k: np.asarray(v) for k, v in inputs.items()})


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def golden_tensors(seed=0, cases=CASE_NAMES, version=GOLDEN_VERSION) -> tuple[dict, dict]:
    """All arrays (each prefixed ``<case>/``) and the metadata of a golden file."""
    if version == 1:
        bad = [c for c in cases if c not in V1_CASES]
        if bad:
            raise ValueError(f"format 1 holds only the cases {V1_CASES}, got {bad}")
        first = get_case("mlp")
        meta = {"levels": list(first.levels), "lambdas": first.lambdas, "lr": first.lr, "seed": seed,
                "networks": {c: {"layers": list(get_case(c).layers),
                                 "input_shape": list(get_case(c).input_shape)} for c in cases},
                "description": "one joint DRESS step and one SGD step (no momentum, no weight decay) "
                               "on two tiny float64 networks; see docs/golden-format.md"}
    elif version == GOLDEN_VERSION:
        meta = {"seed": seed, "cases": {},
                "description": "named cases of DRESS joint steps with plain SGD on tiny networks, "
                               "each exercising one rule; see docs/golden-format.md"}
    else:
        raise ValueError(f"version must be one of {READ_VERSIONS}, got {version!r}")
    arrays = {}
    for name in cases:
        case = get_case(name)
        inputs = case_inputs(case, seed)
        tensors = run_case(case, inputs)
        if version == 1:
            tensors = _v1_names(tensors)
        else:
            meta["cases"][name] = {**case.meta(), "inputs_sha256": inputs_digest(inputs)}
        arrays.update({f"{name}/{k}": v for k, v in tensors.items()})
    return arrays, meta


def write_golden(path, seed=0, cases=CASE_NAMES, version=GOLDEN_VERSION):
    """Write the golden file of ``cases`` (names of ``CASES``) in format ``version``."""
    arrays, meta = golden_tensors(seed, tuple(cases), version)
    return write_archive(path, arrays, meta, GOLDEN_KIND, version)


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------

def compare_tensors(ours, theirs, tolerance, n_show=5) -> dict:
    """Compare two arrays as llm.c's ``check_tensor`` does.

    Parameters
    ----------
    ours, theirs : array-likes (compared in float64; integer arrays must be equal)
    tolerance : float, the largest absolute difference that passes (0 for integer arrays)

    Returns
    -------
    dict with ``max_diff`` (NaN if either side holds a NaN or the shapes differ: a NaN never
    passes), ``tolerance``, ``ok``, ``first``: the first
    ``n_show`` mismatching entries in C order, each ``(flat index, ours, theirs)``.
    """
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if ours.dtype.kind in "biu" and theirs.dtype.kind in "biu":
        tolerance = 0.0
    if ours.shape != theirs.shape:
        return {"max_diff": float("nan"), "tolerance": tolerance, "ok": False, "first": [],
                "shape": (ours.shape, theirs.shape)}
    a, b = ours.astype(np.float64).ravel(), theirs.astype(np.float64).ravel()
    diff = np.abs(a - b)
    bad = ~(diff <= tolerance)                             # a NaN on either side is a mismatch
    worst = float("nan") if np.isnan(diff).any() else float(np.max(diff, initial=0.0))
    first = [(int(i), float(a[i]), float(b[i])) for i in np.flatnonzero(bad)[:n_show]]
    return {"max_diff": worst, "tolerance": tolerance, "ok": not bad.any(), "first": first}


@dataclass
class GoldenReport:
    """What ``check_golden`` found. ``tensors``: name -> ``compare_tensors`` result plus
    ``role`` ("input": against the seed's inputs, exactly; "output": against minidress's
    recomputation from the file's inputs). ``missing``: documented tensors the file lacks;
    ``unexpected``: names the format does not have; ``notes``: what was not checked."""
    path: str
    version: int
    seed: int
    tensors: dict = field(default_factory=dict)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def failing(self) -> list:
        return [name for name, r in self.tensors.items() if not r["ok"]]

    @property
    def ok(self) -> bool:
        return not (self.failing or self.missing or self.unexpected)


def load_golden(path) -> tuple[dict, dict | None, list]:
    """``(arrays, meta or None, notes)`` of a golden file, by minidress or another implementation.

    A file with ``__sha256__`` is read and verified as a minidress archive (a wrong checksum,
    kind or version is an ``ArchiveError``). A file without one is read as a plain ``.npz``
    (``allow_pickle=False``), with its ``__meta__`` if it has one: other implementations need
    write neither.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such golden file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            arrays = {} if "__sha256__" in names else {k: z[k] for k in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file: {' '.join(str(e).split())}") from None
    if "__sha256__" in names:
        arrays, meta = read_archive(path, GOLDEN_KIND, set(READ_VERSIONS))
        return arrays, meta, []
    notes = [f"{path} has no __sha256__: its integrity is not checked"]
    raw = arrays.pop("__meta__", None)
    if raw is None:
        return arrays, None, notes + ["no __meta__: taken as format 2"]
    meta = json.loads(raw.tobytes().decode())
    if meta.get("kind") != GOLDEN_KIND or meta.get("format_version") not in READ_VERSIONS:
        raise ValueError(f"{path}: __meta__ must have kind {GOLDEN_KIND!r} and format_version in "
                         f"{READ_VERSIONS}, got {meta.get('kind')!r} and {meta.get('format_version')!r}")
    return arrays, meta, notes


def check_golden(path, case=None, seed=None, tolerance=None, n_show=5) -> GoldenReport:
    """Check a golden file tensor by tensor.

    Parameters
    ----------
    path : the file (written by ``write_golden`` or by another implementation, same names)
    case : str, optional; check only this case (default: every case the file holds)
    seed : int, optional; the seed of a file without ``__meta__`` (default 0; a file's own
        ``__meta__["seed"]`` wins)
    tolerance : float, optional; overrides every case's documented tolerance
    n_show : int, mismatching entries to keep per tensor

    For each case: the file's inputs must equal the inputs regenerated from the seed bit for bit
    (``role="input"``), and every other tensor must match minidress's recomputation from the
    file's inputs to the case's tolerance (``role="output"``).
    """
    arrays, meta, notes = load_golden(path)
    version = meta["format_version"] if meta else GOLDEN_VERSION
    seed = int(meta["seed"]) if meta and "seed" in meta else int(seed or 0)
    present = sorted({k.split("/", 1)[0] for k in arrays} & set(CASE_NAMES),
                     key=CASE_NAMES.index)
    if case is not None:
        if case not in present:
            raise ValueError(f"{path}: case must be one of the file's cases {present}, got {case!r}")
        present = [case]
    report = GoldenReport(str(path), version, seed, notes=notes)
    for name in present:
        c, prefix = get_case(name), f"{name}/"
        if version == 1 and name not in V1_CASES:
            raise ValueError(f"{path}: a format 1 file holds only {V1_CASES}, got case {name!r}")
        theirs = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        expected_inputs = case_inputs(c, seed)
        given = {k: _require_like(theirs.get(k), v, f"{path}: {prefix}{k}") for k, v in expected_inputs.items()}
        fresh = run_case(c, given)
        if version == 1:
            fresh = _v1_names(fresh)
        tol = c.tolerance if tolerance is None else tolerance
        for k, ours in fresh.items():
            if k not in theirs:
                report.missing.append(prefix + k)
                continue
            is_input = k in expected_inputs
            r = compare_tensors(expected_inputs[k] if is_input else ours, theirs[k],
                                0.0 if is_input else tol, n_show)
            report.tensors[prefix + k] = {**r, "role": "input" if is_input else "output"}
        report.unexpected += [prefix + k for k in theirs if k not in fresh]
    if case is None:                   # names outside every known case: a typo is never skipped
        report.unexpected += sorted(k for k in arrays if k.split("/", 1)[0] not in present)
    return report


def format_report(report: GoldenReport) -> list[str]:
    """The lines ``minidress golden --check`` prints: one per tensor (max difference, tolerance,
    OK / NOT OK), the first mismatching entries under each failing one, then a verdict."""
    lines = [f"note: {n}" for n in report.notes]
    width = max(map(len, report.tensors), default=10)
    for name, r in report.tensors.items():
        what = " (input: must equal the seed's)" if r["role"] == "input" and not r["ok"] else ""
        lines.append(f"{name:<{width}}  max abs diff {r['max_diff']:.3e}  tol {r['tolerance']:.0e}  "
                     f"{'OK' if r['ok'] else 'NOT OK'}{what}")
        if "shape" in r:
            lines.append(f"{'':<{width}}    shape: ours {r['shape'][0]}, file {r['shape'][1]}")
        for i, ours, theirs in r["first"]:
            lines.append(f"{'':<{width}}    [{i}] ours {ours!r:<24} file {theirs!r:<24} NOT OK")
    lines += [f"missing from the file: {n}" for n in report.missing]
    lines += [f"not in the format: {n}" for n in report.unexpected]
    diffs = [r["max_diff"] for r in report.tensors.values()]
    worst = max(diffs, key=lambda d: np.inf if np.isnan(d) else d, default=0.0)
    lines.append(f"{len(report.tensors)} tensors (format {report.version}, seed {report.seed}), largest "
                 f"difference {worst:.3e}; {len(report.failing)} NOT OK, {len(report.missing)} "
                 f"missing, {len(report.unexpected)} unexpected: {'OK' if report.ok else 'MISMATCH'}")
    return lines
