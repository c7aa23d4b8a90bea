"""minidress: a NumPy/Numba reference implementation of DRESS (Dynamic REal-time Sparse Subnets)."""
__version__ = "0.1.0"
