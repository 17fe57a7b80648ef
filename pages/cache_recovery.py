"""What the app shows instead of its views when the cache file cannot be opened."""

from __future__ import annotations

import streamlit as st

from backend.service import CacheFileError, CorruptCacheError, move_aside


def show(error: CacheFileError) -> None:
    """The reason, and what can be done: move a damaged file aside (never deleted), or retry
    once another process has released the cache."""
    st.error(str(error))
    if isinstance(error, CorruptCacheError):
        if st.button("Move the damaged file aside and start a new cache", type="primary"):
            moved = move_aside(error.path)
            st.success(f"The old cache is kept as {moved.name}; a new one starts now.")
            st.button("Continue")
    elif st.button("Try again"):
        st.rerun()
