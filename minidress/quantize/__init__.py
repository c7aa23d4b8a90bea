"""Compressing a trained DRESS model beyond its nested store: quantization-aware fine-tuning of
the levels (``qat``), universal (dithered lattice) quantization with a lossless coder
(``universal``) and ADMM quantization on DRESS's row-balanced sets (``admm``). The quantized
store they feed is ``minidress.deploy.quantized``; this package is training code, at the floor of
``minidress.pruning``."""
