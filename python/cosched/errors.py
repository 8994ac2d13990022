"""The one exception type cosched raises for bad input."""

from __future__ import annotations

import tvm_ffi


# Registered with tvm-ffi so that an error raised inside a pass keeps its type across the FFI boundary.
@tvm_ffi.register_error("CoschedError")
class CoschedError(Exception):
    """A user-facing error: says which tenant is concerned and what to do about it."""

    def __init__(self, message: str, *, tenant: str | None = None, hint: str | None = None):
        self.tenant = tenant
        self.hint = hint
        text = f"tenant '{tenant}': {message}" if tenant else message
        if hint:
            text += f" ({hint})"
        super().__init__(text)
