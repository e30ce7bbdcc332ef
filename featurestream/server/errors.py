"""The one error type of the server: an HTTP status with a JSON body naming the field and the fix."""

from __future__ import annotations

import msgspec

from engine.errors import FeaturestreamError

__all__ = ["ApiError"]


class ApiError(FeaturestreamError):
    """An answer other than success: ``status``, a stable ``code``, what is wrong and how to fix it.

    The body is ``{"error": code, "message": ..., "field": ..., "fix": ...}``; ``field`` names the
    part of the request to blame (``features[2]``, ``entities.user_id[0]``, ``Authorization``).
    Messages never carry a key or secret.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        fix: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.fix = fix
        self.headers = headers or {}

    def body(self) -> bytes:
        out: dict[str, str] = {"error": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.fix is not None:
            out["fix"] = self.fix
        return msgspec.json.encode(out)
