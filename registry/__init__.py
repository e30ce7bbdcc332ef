"""The registry: immutable feature view versions, lineage to models, and drift history."""

from registry.core import Registry, RegistryError

__all__ = ["Registry", "RegistryError"]
