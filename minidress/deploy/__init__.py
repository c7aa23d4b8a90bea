"""Deployment: the parameter-reusing store (float and quantized), the deployed model that switches
density in constant time, the memory a device needs, and the real-time serving demonstration.
Nothing here imports training code."""
from .memory import device_memory
from .quantized import QSTORE_KIND, QSTORE_VERSION, QuantizedRowSparse, QuantizedStore
from .runtime import BACKENDS, DeployedModel
from .store import ORDERS, STORE_KIND, STORE_VERSION, RowSparse, Store, pack_rows

__all__ = ["BACKENDS", "DeployedModel", "ORDERS", "QSTORE_KIND", "QSTORE_VERSION", "QuantizedRowSparse",
           "QuantizedStore", "RowSparse", "STORE_KIND", "STORE_VERSION", "Store", "device_memory",
           "pack_rows"]
