"""The content-addressed store (DESIGN.md "On disk", "Writing")."""

from castore.store.locks import FileLock, live_lock, read_lock
from castore.store.models import ActionEntry, LockInfo
from castore.store.store import Store, default_root

__all__ = [
    "ActionEntry",
    "FileLock",
    "LockInfo",
    "Store",
    "default_root",
    "live_lock",
    "read_lock",
]
