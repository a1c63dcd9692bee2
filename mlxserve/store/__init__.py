"""Content-addressed model store (blocking); see store.py for the on-disk layout."""

from .names import DEFAULT_REGISTRY, ModelName, parse_name
from .store import ResolvedModel, Store

__all__ = ["DEFAULT_REGISTRY", "ModelName", "ResolvedModel", "Store", "parse_name"]
