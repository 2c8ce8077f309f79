"""Exceptions -> OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` and HTTP status.

400 invalid parameters (SamplingParamError, EmptyInputError, InvalidRequest, validation, malformed JSON),
400 ``context_length_exceeded``, 403 a Host / Origin not served (hosts.py), 404 ``model_not_found``, 429
queue full (with Retry-After), 503 while a model cannot load, was unloaded under the request, or the server
shuts down. Anything else is a bug: 500 in the same shape, with an id that the log's traceback carries
(never the exception's text).
"""

from __future__ import annotations

import logging
import re
import uuid

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import errors as E

log = logging.getLogger(__name__)


class ShuttingDown(E.TTAEngineError):
    """The server stopped this request because it is shutting down (its grace period ran out)."""

    def __init__(self):
        super().__init__("the server is shutting down and stopped this request; retry it")


_UNAVAILABLE = (E.ArtifactError, E.ModelNotAvailableError, E.BackendUnavailableError, E.ExportError)


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _param_of(message: str) -> str | None:
    m = re.search(r"parameter\(?s?\)? (\w+)", message)
    return m.group(1) if m else None


def error_body(exc: BaseException) -> JSONResponse:
    """The response for ``exc``."""
    msg = str(exc)
    if isinstance(exc, RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg', '')}", "invalid_request_error",
                                  code="invalid_json")
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                           for e in errs[:5])
        return error_response(400, f"invalid request: {detail}", "invalid_request_error",
                              param=".".join(loc) or None, code="invalid_value")
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error",
                              code="not_found" if exc.status_code == 404 else None)
    if isinstance(exc, E.UnknownModelError):
        return error_response(404, msg, "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, E.ContextLengthError):
        return error_response(400, msg, "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, E.ModelUnloadedError):  # not the client's rate: the model went while it ran
        return error_response(503, msg, "server_error", code="model_unloaded", headers={"Retry-After": "1"})
    if isinstance(exc, E.OverloadedError):
        return error_response(429, msg, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, ShuttingDown):
        return error_response(503, msg, "server_error", code="server_shutting_down")
    if isinstance(exc, _UNAVAILABLE):
        return error_response(503, msg, "server_error", code="model_unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, E.TTAEngineError):  # InvalidRequest, SamplingParamError, EmptyInputError, ...
        structured = type(exc).__name__ == "StructuredOutputError"  # a response_format that does not compile
        param = "response_format" if structured else getattr(exc, "param", None) or _param_of(msg)
        return error_response(400, msg, "invalid_request_error", param, "invalid_value")
    error_id = uuid.uuid4().hex[:12]  # the traceback goes to the log under this id; the client gets the id
    log.error("internal error %s", error_id, exc_info=exc)
    return error_response(500, f"internal server error (id {error_id}); the server log has the details under "
                          "this id", "server_error", code="internal_error")
