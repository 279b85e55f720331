"""Errors in OpenAI's shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    503: "server_overloaded",
    504: "timeout_error",
}


class APIError(Exception):
    """A request answered with an error: its HTTP status, and the field at fault if any."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    kind = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)
