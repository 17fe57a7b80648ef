"""What user-typed strings may contain, checked once at the service's boundary.

Text fields (a text to analyse, a problem, an answer) may hold any printable Unicode (emoji,
right-to-left scripts, combining marks), tabs and newlines. They may not hold NUL, other control
characters or lone surrogates (which cannot be encoded, stored or tokenised). Model references
are shorter and single-line.
"""

from __future__ import annotations

import unicodedata

from backend.errors import InputError

MAX_TEXT_CHARS = 100_000
MAX_REFERENCE_CHARS = 1_000
MAX_UPLOAD_BYTES = 50 << 20  # per uploaded file; published trace files are well under 5 MB
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def _bad_character(value: str, allowed: set[str]) -> str | None:
    """A description of the first character a field may not hold, or None."""
    for position, char in enumerate(value):
        if char in allowed:
            continue
        category = unicodedata.category(char)
        if char == "\0":
            return f"a NUL byte at position {position}"
        if category == "Cs":
            return f"a lone surrogate (U+{ord(char):04X}) at position {position}"
        if category == "Cc":
            return f"a control character (U+{ord(char):04X}) at position {position}"
    return None


def check_text(value: object, field: str = "text", max_chars: int = MAX_TEXT_CHARS,
               required: bool = True) -> str:
    """The text, or InputError saying why it cannot be analysed."""
    if not isinstance(value, str):
        raise InputError(f"The {field} must be text, not {type(value).__name__}.")
    if required and not value.strip():
        raise InputError(f"The {field} is empty: type or pick a text to analyse.")
    if len(value) > max_chars:
        raise InputError(f"The {field} has {len(value):,} characters; the limit is "
                         f"{max_chars:,}.")
    bad = _bad_character(value, _ALLOWED_CONTROLS)
    if bad:
        raise InputError(f"The {field} contains {bad}: remove it and try again.")
    return value


def check_reference(value: object) -> str:
    """A model reference (alias, hub id, path) stripped, or InputError; emptiness is left to
    the model resolver, which says which models there are."""
    if not isinstance(value, str):
        raise InputError(f"The model reference must be text, not {type(value).__name__}.")
    value = value.strip()
    if len(value) > MAX_REFERENCE_CHARS:
        raise InputError(f"The model reference has {len(value):,} characters; the limit is "
                         f"{MAX_REFERENCE_CHARS:,}.")
    bad = _bad_character(value, set())
    if bad:
        raise InputError(f"The model reference contains {bad}: it cannot name a model.")
    return value


def check_upload(files: dict[str, bytes], max_bytes: int = MAX_UPLOAD_BYTES) -> None:
    """InputError for an uploaded file over the size limit."""
    for name, data in files.items():
        if len(data) > max_bytes:
            raise InputError(f"{name} has {len(data) / 2**20:.1f} MiB; the limit is "
                             f"{max_bytes / 2**20:.0f} MiB per file.")


def check_strings(value: object, field: str) -> None:
    """check_text on every string inside parsed JSON (dicts, lists), empty ones allowed."""
    if isinstance(value, str):
        check_text(value, field, max_chars=MAX_UPLOAD_BYTES, required=False)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(key, field)
            check_strings(item, field)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_strings(item, field)
