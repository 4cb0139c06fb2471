"""One error vocabulary. Handlers raise these; one middleware renders OpenAI's error shape."""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar


class RoleMeshError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


def error_bytes(message: str, type_: str, code: str) -> bytes:
    return json.dumps(error_body(message, type_, code)).encode()


class BadRequest(RoleMeshError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class MissingModel(BadRequest):
    code = "missing_model"


class UnknownDevice(BadRequest):
    code = "unknown_device"


class ContextTooLong(BadRequest):
    """The prompt is longer than the context of every model that could take it."""

    code = "context_length_exceeded"


class Unauthorized(RoleMeshError):
    status = 401
    code = "invalid_token"
    type = "authentication_error"


class Forbidden(RoleMeshError):
    status = 403
    code = "forbidden"
    type = "authentication_error"


class NotFound(RoleMeshError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class NodeNotFound(NotFound):
    code = "node_not_found"


class BodyTooLarge(RoleMeshError):
    status = 413
    code = "body_too_large"
    type = "invalid_request_error"


class PreconditionFailed(RoleMeshError):
    """A write based on a version that is no longer current (If-Match)."""

    status = 412
    code = "stale_version"
    type = "invalid_request_error"


class ModelDoesNotFit(RoleMeshError):
    """Permanent: no device is large enough, so a retry cannot help (hence 4xx)."""

    status = 422
    code = "model_does_not_fit"
    type = "invalid_request_error"


class UpstreamFailed(RoleMeshError):
    status = 502
    code = "upstream_failed"
    type = "server_error"


class Unavailable(RoleMeshError):
    """503s carry Retry-After so clients (the openai SDK included) back off and retry."""

    status = 503
    code = "unavailable"
    type = "server_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0,
                 headers: dict[str, str] | None = None) -> None:
        merged = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
        merged.update(headers or {})
        super().__init__(message, headers=merged)
        self.retry_after_s = retry_after_s


class DeviceBusy(Unavailable):
    code = "device_busy"


class ModelNotReady(Unavailable):
    code = "model_not_ready"


class NoNodeAvailable(Unavailable):
    code = "no_node_available"


class GatewayTimeout(RoleMeshError):
    status = 504
    code = "upstream_timeout"
    type = "server_error"


class QueueTimeout(RoleMeshError):
    """A request waited its whole queue timeout for a turn: distinct from a full queue."""

    status = 504
    code = "queue_timeout"
    type = "server_error"


class NodeDraining(Unavailable):
    code = "node_draining"


class Conflict(RoleMeshError):
    status = 409
    code = "conflict"
    type = "invalid_request_error"
