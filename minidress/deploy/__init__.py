"""Deployment: the parameter-reusing store, the deployed model that switches density in constant
time, and the real-time serving demonstration. Nothing here imports training code."""
from .runtime import BACKENDS, DeployedModel
from .store import ORDERS, STORE_KIND, STORE_VERSION, RowSparse, Store, pack_rows

__all__ = ["BACKENDS", "DeployedModel", "ORDERS", "STORE_KIND", "STORE_VERSION", "RowSparse",
           "Store", "pack_rows"]
