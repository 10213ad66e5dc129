"""castore: data pipelines over a content-addressed store."""

from castore._version import __version__
from castore.errors import CastoreError
from castore.store import Store

__all__ = ["CastoreError", "Store", "__version__"]
