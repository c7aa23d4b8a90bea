"""The guard that drops Numba cache files compiled from other versions of the kernel sources."""
from minidress.kernels._cache import drop_stale_caches, sources_digest


def _package(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "__pycache__").mkdir()
    cached = tmp_path / "__pycache__" / "a.f-1.py311.nbi"
    cached.write_bytes(b"index")
    return cached


def test_first_import_drops_unrecorded_caches_then_keeps_them(tmp_path):
    cached = _package(tmp_path)
    assert drop_stale_caches(tmp_path) is True and not cached.exists()
    cached.write_bytes(b"index")                      # compiled from the recorded sources
    assert drop_stale_caches(tmp_path) is False and cached.exists()


def test_a_changed_source_drops_every_cache_file(tmp_path):
    cached = _package(tmp_path)
    drop_stale_caches(tmp_path)
    cached.write_bytes(b"index")
    other = tmp_path / "__pycache__" / "b.g-2.py311.nbc"
    other.write_bytes(b"code")
    (tmp_path / "b.py").write_text("y = 2\n")         # another file of the package changes
    assert drop_stale_caches(tmp_path) is True
    assert not cached.exists() and not other.exists()


def test_digest_depends_on_names_and_bytes(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    d1 = sources_digest(tmp_path)
    (tmp_path / "a.py").write_text("x = 2\n")
    d2 = sources_digest(tmp_path)
    (tmp_path / "a.py").rename(tmp_path / "b.py")
    assert len({d1, d2, sources_digest(tmp_path)}) == 3


def test_the_blas_of_compiled_products_counts_as_a_source(tmp_path, monkeypatch):
    """A cache compiled to call NumPy's cblas must not be loaded where ``np.dot`` is used, nor the
    other way round: the choice (``blas.BACKEND``) is part of the digest."""
    from minidress.kernels import _cache
    _package(tmp_path)
    before = sources_digest(tmp_path)
    monkeypatch.setattr(_cache, "BACKEND", _cache.BACKEND + " (another)")
    assert sources_digest(tmp_path) != before


def test_no_external_blas_call_where_no_guard_watches_the_cache(tmp_path):
    """With ``NUMBA_CACHE_DIR`` set, Numba caches outside this package, where ``_cache`` cannot
    drop code compiled for another BLAS: there compiled products use ``np.dot`` (a stale call to
    a symbol another process never loaded would crash it)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "from minidress.kernels import blas; print(blas.BACKEND)"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "numba np.dot"
