"""One exception type for every problem a user can fix: bad configuration, bad input, missing files.

The CLI prints these as one clear line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class LlmpressError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(LlmpressError):
    """A recipe or params file that does not validate; the message names each bad field."""


def redact(text: str) -> str:
    """`text` with URI user info and query strings masked: what may be shown, logged or recorded."""
    text = re.sub(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]*@", r"\1***@", text)
    return re.sub(r"(://[^\s?'\"]*)\?[^\s'\"]*", r"\1?***", text)
