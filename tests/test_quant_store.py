"""The quantized nested store: kernels bit for bit their NumPy references (int8 and int4, one
sample and a batch), the grid independent of the level (every level a prefix), the deployed model
reading the quantized values, exact file round trips, and a loader that refuses a bad scale, a
wrong bit width or an off-grid entry with one ArchiveError line (plus a small fuzz)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidress.checkpoint import ArchiveError, write_archive
from minidress.deploy.memory import device_memory
from minidress.deploy.quantized import QSTORE_KIND, QuantizedStore
from minidress.deploy.runtime import DeployedModel
from minidress.deploy.store import Store
from minidress.kernels.quantized import (column_bits, lehmer_decode, lehmer_encode, lehmer_widths, pack_bits,
                                         pack_codes, pack_int4, qmatmul, qmatmul_reference, qmatvec_t,
                                         qmatvec_t_no_gather, qmatvec_t_reference, qmax, quantize_rows,
                                         row_scales, unpack_bits, unpack_codes, unpack_int4)
from test_checkpoint import resign
from test_store import make_dress


def random_quantized(rng, rows, row_len, kmax, bits, dtype=np.float32):
    q = rng.integers(-qmax(bits), qmax(bits) + 1, (kmax, rows)).astype(np.int8)
    ct = np.stack([rng.permutation(row_len)[:kmax] for _ in range(rows)], axis=1).astype(np.uint16)
    scale = (rng.random(rows) + 0.1).astype(dtype)
    return q, (q if bits == 8 else pack_int4(q)), ct, scale


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_equal_their_references_bit_for_bit(rng, bits, dtype):
    q, qt, ct, scale = random_quantized(rng, 37, 50, 21, bits, dtype)
    x = rng.standard_normal(50).astype(dtype)
    xt = rng.standard_normal((50, 9)).astype(dtype)
    for k in (0, 1, 2, 7, 21):
        for kernel in (qmatvec_t, qmatvec_t_no_gather):     # gathers, and each entry loaded alone
            y = np.empty(37, dtype)
            kernel(qt, ct, scale, bits, k, x, y)
            assert np.array_equal(y, qmatvec_t_reference(qt, ct, scale, bits, k, x)), kernel.__name__
        yb = np.empty((37, 9), dtype)
        qmatmul(qt, ct, scale, bits, k, xt, yb)
        assert np.array_equal(yb, qmatmul_reference(qt, ct, scale, bits, k, xt))
        # and the sums are those of the dequantized weights (up to rounding)
        w = q[:k].astype(np.float64) * scale[None, :]
        assert np.allclose(y, (w * x[ct[:k]]).sum(axis=0), rtol=1e-4, atol=1e-4)


def test_int4_and_column_packing_round_trip(rng):
    q = rng.integers(-7, 8, (9, 5)).astype(np.int8)
    packed = pack_int4(q)
    assert packed.shape == (5, 5) and np.array_equal(unpack_int4(packed, 9), q)
    cols = rng.integers(0, 300, 101)
    assert pack_bits(cols, 9).size == -(-101 * 9 // 8)
    assert np.array_equal(unpack_bits(pack_bits(cols, 9), 9, 101), cols)
    assert column_bits(1) == 1 and column_bits(256) == 8 and column_bits(257) == 9


def test_scale_is_per_row_max_abs_and_zero_rows_get_one():
    v = np.array([[0.5, -2.54, 1.0], [0.0, 0.0, 0.0]], np.float32)
    s = row_scales(v, 8)
    assert s[0] == np.float32(2.54 / 127) and s[1] == 1
    assert quantize_rows(v, s, 8).tolist() == [[25, -127, 50], [0, 0, 0]]
    with pytest.raises(ValueError, match="bits must be one of"):
        row_scales(v, 3)



@pytest.mark.parametrize("row_len,kmax", [(288, 288), (288, 29), (50, 21), (2, 2), (1, 1), (300, 0)])
def test_lehmer_codes_round_trip_and_every_prefix_decodes_alone(rng, row_len, kmax):
    cols = np.stack([rng.permutation(row_len)[:kmax] for _ in range(7)]).reshape(7, kmax)
    codes, widths = lehmer_encode(cols), lehmer_widths(row_len, kmax)
    assert np.all(codes < row_len - np.arange(kmax)) and np.all(codes < (1 << widths))
    packed = pack_codes(codes, widths)
    assert packed.size == -(-7 * int(widths.sum()) // 8)
    assert np.array_equal(unpack_codes(packed, widths, 7), codes)
    for k in sorted({0, 1, kmax // 3, kmax}):        # a level's codes alone give its columns
        assert np.array_equal(lehmer_decode(codes[:, :k], row_len), cols[:, :k])
    if row_len == kmax == 288:
        assert widths.sum() == 2081                  # against 288 * 9 = 2592 bits, fixed width
    with pytest.raises(ValueError, match="not below"):
        lehmer_decode(np.full((1, 1), row_len), row_len)

@pytest.fixture(scope="module")
def stores():
    dress, meta = make_dress(dtype=np.float32)
    store = Store.from_dress(dress, "rank", meta)
    return store, {bits: QuantizedStore.from_store(store, bits) for bits in (8, 4)}


@pytest.mark.parametrize("bits", [8, 4])
def test_every_level_is_a_prefix_and_the_grid_does_not_depend_on_the_level(stores, bits):
    store, qs = stores[0], stores[1][bits]
    for name, rs in store.sparse.items():
        qrs = qs.sparse[name]
        assert np.array_equal(qrs.cols, rs.cols)
        # Quantizing only a level's prefix (its own max-abs would be the same: rank order puts
        # the largest entry first) gives that prefix of the stored grid values.
        for k in rs.prefix:
            assert np.array_equal(quantize_rows(rs.values[:, :k], qrs.scale, bits), qrs.entries()[:, :k])
        err = np.abs(qrs.values - rs.values).max(axis=1)
        assert np.all(err <= qrs.scale / 2 * (1 + 1e-5))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("batch", [1, 6])
def test_deployed_quantized_model_is_the_dequantized_network(stores, bits, batch, rng):
    qs = stores[1][bits]
    deployed = DeployedModel.from_store(qs, paths="sparse")
    reference = DeployedModel.from_store(qs.dequantized(), backend="dense")
    x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
    for d in (1.0, 0.5, 0.25, 0.1, 0.37):
        a, b = deployed.set_density(d).predict(x), reference.set_density(d).predict(x)
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4), d
    assert deployed.memory_bytes()["store"] == qs.nbytes()


@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_round_trip_is_exact_and_smaller(stores, bits, tmp_path):
    store, qs = stores[0], stores[1][bits]
    back = QuantizedStore.load(qs.save(tmp_path / "q.npz"))
    assert back.bits == bits and back.levels == qs.levels
    for name, rs in qs.sparse.items():
        for field in ("q", "scale", "cols", "prefix"):
            assert np.array_equal(getattr(back.sparse[name], field), getattr(rs, field))
    floats = sum(rs.values.nbytes + rs.cols.nbytes for rs in store.sparse.values())
    assert qs.sparse_nbytes() < (0.33 if bits == 8 else 0.25) * floats     # Lehmer-coded columns


def edited(path, tmp_path, edit_arrays=None, edit_meta=None):
    return resign(path, tmp_path / "bad.npz", QSTORE_KIND, edit_arrays, edit_meta)


def _set(key, value, count=1):
    def edit(arrays):
        name = next(k for k in arrays if k.endswith(key))
        arrays[name] = arrays[name].copy()
        arrays[name].flat[:count] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set("/scale", 0.0), "expected finite scales > 0"),
    (_set("/scale", np.nan), "expected finite scales > 0"),
    (_set("/scale", -1.0), "expected finite scales > 0"),
    (_set("/q", -128), "off the symmetric 8-bit grid"),
    (_set("/cols_lehmer", 255, 2), "is not below the .* columns still free"),
])
def test_loader_refuses_bad_arrays_in_one_line(stores, tmp_path, edit, message):
    path = stores[1][8].save(tmp_path / "q.npz")
    with pytest.raises(ArchiveError, match=message) as info:
        QuantizedStore.load(edited(path, tmp_path, edit))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize("bits", [3, 16, True, "8", None])
def test_loader_refuses_a_wrong_bit_width(stores, tmp_path, bits):
    path = stores[1][8].save(tmp_path / "q.npz")
    with pytest.raises(ArchiveError, match="'bits' must be one of"):
        QuantizedStore.load(edited(path, tmp_path, edit_meta=lambda m: m.update(bits=bits)))


def test_int4_off_grid_nibble_and_int8_file_read_as_int4_are_refused(stores, tmp_path):
    path = stores[1][4].save(tmp_path / "q4.npz")
    with pytest.raises(ArchiveError, match="off the symmetric 4-bit grid"):
        QuantizedStore.load(edited(path, tmp_path, _set("/q", 0x08)))       # nibble -8
    path = stores[1][8].save(tmp_path / "q8.npz")
    with pytest.raises(ArchiveError, match="must be int8 of shape"):
        QuantizedStore.load(edited(path, tmp_path, edit_meta=lambda m: m.update(bits=4)))


def test_a_float_store_file_is_not_a_quantized_one(stores, tmp_path):
    path = stores[0].save(tmp_path / "f.npz")
    with pytest.raises(ArchiveError, match="expected a 'minidress.qstore' file"):
        QuantizedStore.load(path)


def test_bit_flips_load_the_original_or_are_refused(stores, tmp_path):
    qs = stores[1][4]
    data = qs.save(tmp_path / "q.npz").read_bytes()

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), min_size=1, max_size=3))
    def case(flips):
        damaged = bytearray(data)
        for pos, bit in flips:
            damaged[pos] ^= 1 << bit
        (tmp_path / "flip.npz").write_bytes(bytes(damaged))
        try:
            back = QuantizedStore.load(tmp_path / "flip.npz")
        except ArchiveError as e:
            assert "\n" not in str(e)
            return
        for name, rs in qs.sparse.items():
            assert np.array_equal(back.sparse[name].q, rs.q) and np.array_equal(back.sparse[name].scale, rs.scale)
    case()


def test_format_1_files_with_fixed_width_columns_still_load(stores, tmp_path):
    qs = stores[1][8]
    arrays = {k.replace("/cols_lehmer", "/cols_packed"): a for k, a in qs.arrays(at_rest=True).items()}
    for name, rs in qs.sparse.items():
        arrays[f"sparse/{name}/cols_packed"] = pack_bits(rs.cols, column_bits(rs.row_len))
    path = tmp_path / "v1.npz"
    meta = {**qs.meta, "levels": list(qs.levels), "order": qs.order, "bits": 8,
            "sparse_layers": {n: list(rs.shape) for n, rs in qs.sparse.items()}, "per_level": list(qs.per_level)}
    back = QuantizedStore.load(write_archive(path, arrays, meta, QSTORE_KIND, 1))
    for name, rs in qs.sparse.items():
        assert np.array_equal(back.sparse[name].cols, rs.cols) and np.array_equal(back.sparse[name].q, rs.q)


def test_level_bytes_count_the_level_s_own_lehmer_codes(stores):
    qs = stores[1][8]
    mem = device_memory(qs, [1.0, 0.1])
    dense = sum(a.nbytes // a.shape[0] if n in qs.per_level else a.nbytes for n, a in qs.dense.items())
    for d in (1.0, 0.1):
        expect = dense
        for rs in qs.sparse.values():
            k = int(rs.prefix[list(qs.levels).index(d)])
            expect += rs.shape[0] * k + -(-rs.shape[0] * int(lehmer_widths(rs.row_len, k).sum()) // 8) + rs.scale.nbytes
        assert mem[d]["params_level"] == expect
    assert mem[1.0]["params_store"] == qs.nbytes(at_rest=True)


def test_random_column_codes_load_as_a_valid_store_or_fail_in_one_line(stores, tmp_path):
    path = stores[1][8].save(tmp_path / "q.npz")

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8))
    def case(edits):
        def edit(arrays):
            name = next(k for k in sorted(arrays) if k.endswith("/cols_lehmer"))
            a = arrays[name] = arrays[name].copy()
            for pos, value in edits:
                a[pos % a.size] = value
        try:
            back = QuantizedStore.load(edited(path, tmp_path, edit))
        except ArchiveError as e:
            assert "\n" not in str(e)
            return
        back.validate()          # distinct columns in range: the store serves
    case()
