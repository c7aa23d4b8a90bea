"""Masks: exact per-row counts, nesting, tie-breaking, and clear errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidress.dress import DressOptions
from minidress.masks import (check_density, global_topk_masks, layerwise_topk_mask,
                             n_kept, row_ranks, row_ranks_reference, row_topk_mask,
                             structured_row_mask)

densities = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
shapes = st.one_of(
    st.tuples(st.integers(1, 9), st.integers(1, 40)),                       # Linear [out, in]
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)))  # Conv


def weights(shape, seed, ties=False):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    # With ties, magnitudes come from a handful of values, both signs.
    return np.round(w) if ties else w


@settings(max_examples=60, deadline=None)
@given(shape=shapes, d=densities, seed=st.integers(0, 2**16), ties=st.booleans())
def test_every_row_keeps_exactly_n_kept(shape, d, seed, ties):
    w = weights(shape, seed, ties)
    mask = row_topk_mask(w, d)
    assert mask.shape == w.shape and mask.dtype == bool
    row_len = int(np.prod(shape[1:]))
    assert np.all(mask.reshape(shape[0], -1).sum(axis=1) == n_kept(d, row_len))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, d=densities, seed=st.integers(0, 2**16))
def test_kept_entries_dominate_dropped_ones(shape, d, seed):
    w = weights(shape, seed, ties=True)
    m = row_topk_mask(w, d).reshape(shape[0], -1)
    a = np.abs(w).reshape(shape[0], -1)
    for r in range(shape[0]):
        if (~m[r]).any():
            assert a[r][m[r]].min() >= a[r][~m[r]].max()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, d1=densities, d2=densities, seed=st.integers(0, 2**16), ties=st.booleans())
def test_levels_are_nested_for_every_pair(shape, d1, d2, seed, ties):
    w = weights(shape, seed, ties)
    lo, hi = sorted((d1, d2))
    assert np.all(row_topk_mask(w, lo) <= row_topk_mask(w, hi))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_go_to_the_lower_column(dtype):
    w = np.array([[1.0, -1.0, 1.0, 0.5], [0.0, 0.0, -0.0, 0.0]], dtype)
    assert row_ranks(w).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert row_topk_mask(w, 0.5).tolist() == [[True, True, False, False], [True, True, False, False]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_importance_scores_of_any_sign_rank_by_value(dtype):
    # -0.0 equals 0.0 (a tie: lower column first); negative scores rank below both.
    scores = np.array([[-1.0, -2.0, -0.0, 0.0, -np.inf, np.inf, 1e-45, -1e-45]], dtype)
    assert row_ranks(np.ones_like(scores), importance_scores=scores).tolist() == [[5, 6, 2, 3, 7, 0, 1, 4]]


def rows_sorted_by_python(scores):
    """The rule itself, in plain Python: sort columns by (-score, column)."""
    ranks = np.empty(scores.shape, np.int32)
    for r, row in enumerate(scores.tolist()):
        for rank, col in enumerate(sorted(range(len(row)), key=lambda c: (-row[c], c))):
            ranks[r, col] = rank
    return ranks


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int64, np.uint64])
def test_integer_scores_rank_by_value_without_wrapping(dtype):
    info = np.iinfo(dtype)
    scores = np.array([[info.min, 0, 5, info.max, 5, info.min]], dtype)
    want = rows_sorted_by_python(scores).tolist()        # Python ints: nothing wraps
    assert want == ([[3, 4, 1, 0, 2, 5]] if info.min == 0 else [[4, 3, 1, 0, 2, 5]])
    assert row_ranks(np.ones(scores.shape), importance_scores=scores).tolist() == want
    assert row_ranks_reference(np.ones(scores.shape), importance_scores=scores).tolist() == want


@settings(max_examples=80, deadline=None)
@given(shape=st.tuples(st.integers(1, 7), st.integers(1, 300)), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]), signed_scores=st.booleans())
def test_fast_ranks_equal_the_stable_sort_bit_for_bit(shape, seed, dtype, signed_scores):
    """``row_ranks`` (float32: one sort of distinct integer keys) against the stable argsort
    and against Python's ``sorted``, on rows full of ties, zeros of both signs, infinities and
    subnormals."""
    rng = np.random.default_rng(seed)
    specials = np.array([0.0, -0.0, 0.5, -0.5, 1.0, np.inf, -np.inf, 1e-45, 3.0], dtype)
    w = rng.standard_normal(shape).astype(dtype)
    pick = rng.random(shape) < 0.5
    w[pick] = rng.choice(specials, size=int(pick.sum()))
    scores = w if signed_scores else None           # |w| by default: all of one sign
    got = row_ranks(w, importance_scores=scores)
    assert got.dtype == np.int32
    assert np.array_equal(got, row_ranks_reference(w, importance_scores=scores))
    assert np.array_equal(got, rows_sorted_by_python(w if signed_scores else np.abs(w)))


def test_fast_ranks_of_conv_weights_and_a_wide_layer():
    rng = np.random.default_rng(3)
    for shape in [(16, 6, 5, 5), (300, 784)]:
        w = np.round(rng.standard_normal(shape) * 4).astype(np.float32) / 4   # many ties
        assert np.array_equal(row_ranks(w), row_ranks_reference(w))


def test_rounding_is_half_up_with_a_floor_of_one():
    assert n_kept(0.5, 5) == 3          # 2.5 rounds up (Python's round would give 2)
    assert n_kept(0.3, 5) == 2          # 1.5 rounds up
    assert n_kept(0.1, 4) == 1          # 0.4 rounds down to 0, floor of one
    assert n_kept(1e-9, 1000) == 1
    assert n_kept(1.0, 7) == 7


def test_density_one_is_dense_and_masks_never_edit_weights():
    w = weights((5, 3, 2, 2), 0)
    before = w.copy()
    assert row_topk_mask(w, 1.0).all()
    assert np.array_equal(w, before)


def test_ranks_are_row_permutations_and_match_importance_scores():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 10))
    r = row_ranks(w)
    assert r.dtype == np.int32
    assert np.all(np.sort(r, axis=1) == np.arange(10))
    scores = rng.random((4, 10))
    assert np.array_equal(row_ranks(w, importance_scores=scores), row_ranks(scores))


def test_between_levels_is_a_prefix_of_the_same_ranking():
    w = weights((6, 50), 1)
    m = row_topk_mask(w, 0.3)
    assert np.all(row_topk_mask(w, 0.1) <= m) and np.all(m <= row_topk_mask(w, 0.5))
    assert np.all(m.sum(axis=1) == 15)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_invalid_densities_are_rejected(bad):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        row_topk_mask(np.ones((2, 3)), bad)
    with pytest.raises(ValueError, match=r"levels must be in \(0, 1\]"):
        DressOptions(levels=(1.0, bad))


def test_invalid_shapes_are_rejected():
    with pytest.raises(TypeError, match="density must be a number"):
        check_density("half")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        row_ranks(np.ones(5))
    with pytest.raises(ValueError, match="importance_scores must have the weight's shape"):
        row_ranks(np.ones((2, 3)), importance_scores=np.ones((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        row_ranks(np.array([[1.0, np.nan]]))


def test_layerwise_global_and_structured_masks():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 20))
    w[0] *= 100  # one loud row takes most of a layer-wise budget, none of a row-wise one
    lw = layerwise_topk_mask(w, 0.1)
    assert lw.sum() == 16 and lw[0].sum() > 2
    assert np.all(row_topk_mask(w, 0.1).sum(axis=1) == 2)
    g = global_topk_masks({"a": w, "b": rng.standard_normal((4, 5))}, 0.1)
    assert g["a"].shape == (8, 20) and g["b"].shape == (4, 5)
    assert g["a"].sum() + g["b"].sum() == n_kept(0.1, 180)
    s = structured_row_mask(w, 0.25)
    assert s.shape == w.shape and s.all(axis=1).sum() == 2 and s[0].all()
    assert np.all(s.all(axis=1) | ~s.any(axis=1))   # rows are all-or-nothing
