"""The one error shape: {"error": {type, code, message, param}}, built in one place."""

from __future__ import annotations

import enum
import logging
import re
import types
import typing
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from core.errors import OutcomeUnknown, Unavailable
from core.http import IDEMPOTENCY_HEADER
from core.structs import NO_NUL, Body
from ledger.store import POSTGRES_DOWN

log = logging.getLogger(__name__)


class ErrorDetail(Body):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorBody(Body):
    error: ErrorDetail


_encode = msgspec.json.Encoder(decimal_format="number").encode

# type per HTTP status, as in Stripe's short fixed list
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "payment_required_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "api_error",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, param)


_PATH = re.compile(r" - at `(\$[^`]*)`$")
_KEY_PATH = re.compile(r" - at `key` in `(\$[^`]*)`$")  # a dict's key was wrong
_NUL_REFUSED = f"Expected `str` matching regex {NO_NUL!r}"

_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _unwrap(tp: Any) -> list[Any]:
    """The types a value of `tp` may be: Annotated and Optional taken apart."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(tp) if arg is not type(None) for t in _unwrap(arg)]
    return [tp]


def _step(tp: Any, name: str | None, index: str | None) -> list[Any]:
    found: list[Any] = []
    for t in _unwrap(tp):
        origin = typing.get_origin(t)
        if name is not None and isinstance(t, type) and issubclass(t, msgspec.Struct):
            found += [f.type for f in msgspec.structs.fields(t) if f.encode_name == name]
        elif name is not None and origin is dict:
            found.append(typing.get_args(t)[1])
        elif index is not None and origin in (list, tuple, set, frozenset):
            found.append(typing.get_args(t)[0])
    return found


def enum_values(kind: Any, path: str) -> list[str]:
    """The values the field at `path` ($.items[3].period) of `kind` accepts, in the
    order the type declares them; [] when it is no enumeration."""
    current = [kind]
    for name, index in _STEP.findall(path.removeprefix("$")):
        current = [t for tp in current for t in _step(tp, name or None, index or None)]
    values: list[str] = []
    for tp in (t for c in current for t in _unwrap(c)):
        if typing.get_origin(tp) is typing.Literal:
            values += [str(v) for v in typing.get_args(tp)]
        elif isinstance(tp, type) and issubclass(tp, enum.Enum):
            values += [str(m.value) for m in tp]
    return list(dict.fromkeys(values))


def from_validation(
    exc: msgspec.ValidationError | msgspec.DecodeError, raw: bytes | None = None, *, kind: Any = None
) -> ApiError:
    """msgspec names the path ("... - at `$.items[3].units`"): carry it into param.
    With the raw body, a wrong value inside an object of free keys (metadata, whose
    path msgspec gives as `$.metadata[...]`) is named by its key: `$.metadata.note`.
    With the decoded `kind`, an invalid enum value's message lists the valid ones."""
    text = str(exc)
    param: str | None = None
    key_match = _KEY_PATH.search(text)
    match = key_match or _PATH.search(text)
    if match:
        param = match.group(1)
        text = text[: match.start()]
    message = text
    if kind is not None and param is not None and message.startswith("Invalid enum value"):
        valid = enum_values(kind, param)
        if valid:
            message += f": expected one of {', '.join(valid)}"
    if isinstance(exc, msgspec.ValidationError) and message.startswith(
        ("Object contains unknown field", "Object missing required field")
    ):
        field = message.split("`")[1] if "`" in message else None
        if field:
            param = f"{param or '$'}.{field}"
    if message.startswith(_NUL_REFUSED):
        message = "must not contain the NUL character (U+0000)" + message[len(_NUL_REFUSED) :]
    if key_match:
        message = f"key: {message[0].lower()}{message[1:]}"
    if param is not None and raw is not None and (key_match or param.endswith("[...]")):
        param = _free_key(param.removesuffix("[...]"), raw, message) or param
    if not isinstance(exc, msgspec.ValidationError):
        message = f"malformed JSON: {message}"
    return invalid(message, param)


_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _free_key(path: str, raw: bytes, message: str) -> str | None:
    """The path of the first key of the object at `path` whose key or value has the
    problem msgspec reported (found again with a plain decode; the error path only)."""
    try:
        node: Any = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    for name, index in _SEGMENT.findall(path.removeprefix("$")):
        try:
            node = node[name] if name else node[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    if not isinstance(node, dict):
        return None
    for key, value in node.items():
        if _has_problem(key, message) or (isinstance(value, str) and _has_problem(value, message)):
            return f"{path}.{key}" if _PLAIN_KEY.match(key) else f"{path}[{msgspec.json.encode(key).decode()}]"
    return None


def _has_problem(text: str, message: str) -> bool:
    if "NUL" in message:
        return "\x00" in text
    longest = re.search(r"length <= (\d+)", message)
    if longest:
        return len(text) > int(longest.group(1))
    shortest = re.search(r"length >= (\d+)", message)
    if shortest:
        return len(text) < int(shortest.group(1))
    return False


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = ErrorBody(error=ErrorDetail(type=_TYPES.get(status, "api_error"), code=code, message=message, param=param))
    return web.Response(status=status, body=_encode(body), content_type="application/json", headers=headers)


UNKNOWN_WITHOUT_KEY = (
    " This request carried no Idempotency-Key and none could be assigned, so a retry may charge"
    " again: check the balance or the usage before retrying."
)


def _unavailable(request: web.Request, exc: BaseException) -> web.Response:
    """503, saying what is known: not charged (Unavailable, or Postgres unreachable
    before anything ran), or possibly charged (OutcomeUnknown, with the key to retry with)."""
    log.warning("dependency_unavailable", extra={"error": str(exc), "path": request.path})
    if isinstance(exc, OutcomeUnknown):
        headers = {IDEMPOTENCY_HEADER: exc.idempotency_key} if exc.idempotency_key else None
        message = exc.answer if exc.idempotency_key else exc.answer + UNKNOWN_WITHOUT_KEY
        return error_response(503, "outcome_unknown", message, IDEMPOTENCY_HEADER, headers)
    if isinstance(exc, Unavailable):
        return error_response(503, "unavailable", exc.answer)
    return error_response(503, "unavailable", "Postgres could not be reached; nothing was charged or changed")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def shape_error(request: web.Request, exc: Exception) -> web.Response:
    """The response for a failure, in the one error shape. A web.HTTPException below 400
    (a redirect) is not a failure: it is raised again."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)
    if isinstance(exc, (Unavailable, *POSTGRES_DOWN)):
        return _unavailable(request, exc)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(413, "payload_too_large", "request body is too large")
    if isinstance(exc, web.HTTPException):
        if exc.status == 404:
            return error_response(404, "not_found", f"no such endpoint: {request.method} {request.path}")
        if exc.status == 405:
            return error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}")
        if exc.status < 400:
            raise exc
        return error_response(exc.status, "invalid_request", exc.reason)
    log.error("unhandled_error", exc_info=exc, extra={"path": request.path})
    return error_response(500, "internal_error", "internal error")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        return shape_error(request, exc)
