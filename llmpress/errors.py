"""One exception type for every problem a user can fix: bad configuration, bad input, missing files.

The CLI prints these as one clear line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LlmpressError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(LlmpressError):
    """A recipe or params file that does not validate; the message names each bad field."""
