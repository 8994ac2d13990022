"""The one exception type cosched raises for bad input."""

from __future__ import annotations


class CoschedError(Exception):
    """A user-facing error: says which tenant is concerned and what to do about it."""

    def __init__(self, message: str, *, tenant: str | None = None, hint: str | None = None):
        self.tenant = tenant
        self.hint = hint
        text = f"tenant '{tenant}': {message}" if tenant else message
        if hint:
            text += f" ({hint})"
        super().__init__(text)
