"""JSON-RPC 2.0: bytes in, bytes out, independent of the transport.

The Dispatcher owns the protocol rules (envelope checks, batches,
notifications, the readiness gate, error mapping); handlers only ever see
parameters that already passed the schema, and nothing a handler raises can
escape to the transport: VmhostError becomes its VDSM code, anything else
becomes code 100 with the traceback kept in the agent log.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from vmhost.api.schema import InvalidParams, Schema, UnknownVerb
from vmhost.errors import GeneralError, RecoveryInProgress, VmhostError

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602

Handler = Callable[[dict[str, Any]], Any]

_RECOVERING = RecoveryInProgress()
_INTERNAL = GeneralError("internal error (see agent log)")
_NOTIFICATION = object()  # request_id of a request without "id"


class _Reject(Exception):
    """Stop processing one request and answer it with this error."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Dispatcher:
    def __init__(self, schema: Schema, table: Mapping[str, Handler],
                 is_ready: Callable[[], bool] = lambda: True,
                 observe: Callable[[str, int | None, float], None] | None = None):
        # A handler the schema does not describe would receive unvalidated
        # parameters; refuse to start rather than serve it.
        unchecked = sorted(set(table) - set(schema.verbs()))
        if unchecked:
            raise ValueError(f"handlers without a schema entry: {unchecked}")
        self._schema = schema
        self._table = dict(table)
        self._is_ready = is_ready
        # observe(verb, error code or None, seconds) after each known verb (metrics).
        self._observe = observe

    def handle_bytes(self, body: bytes) -> bytes | None:
        """Answer one HTTP body (a request or a batch); None if nothing is
        to be sent back because every request was a notification."""
        try:
            message = _decode(body)
        except _Reject as e:
            return encode_error(e.code, e.message)
        if not isinstance(message, list):
            return self._handle_one(message)
        if not message:
            return encode_error(INVALID_REQUEST, "invalid request: empty batch")
        answers = [a for a in map(self._handle_one, message) if a is not None]
        return b"[" + b",".join(answers) + b"]" if answers else None

    def _handle_one(self, request: Any) -> bytes | None:
        # Spec: an invalid request is answered even if it has no id (then
        # with id null, as when the id itself is unreadable).
        try:
            request_id = _request_id(request)
        except _Reject as e:
            return encode_error(e.code, e.message)
        notification = request_id is _NOTIFICATION
        if notification:
            request_id = None
        try:
            _check_envelope(request)
        except _Reject as e:
            return encode_error(e.code, e.message, request_id)
        try:
            result = self._execute(request["method"], request.get("params", {}))
        except _Reject as e:
            return None if notification else encode_error(e.code, e.message, request_id)
        if notification:
            return None
        try:
            return _encode({"jsonrpc": "2.0", "id": request_id, "result": result})
        except (TypeError, ValueError):
            log.exception("cannot encode the result of %s", request["method"])
            return encode_error(_INTERNAL.code, _INTERNAL.text, request_id)

    def _execute(self, method: str, params: dict[str, Any]) -> Any:
        handler = self._table.get(method)
        if handler is None:
            raise _Reject(METHOD_NOT_FOUND, str(UnknownVerb(method)))
        if self._observe is None:
            return self._call(method, handler, params)
        started = time.monotonic()
        code = None
        try:
            return self._call(method, handler, params)
        except _Reject as e:
            code = e.code
            raise
        finally:
            self._observe(method, code, time.monotonic() - started)

    def _call(self, method: str, handler: Handler, params: dict[str, Any]) -> Any:
        try:
            if not self._schema.allowed_while_recovering(method) and not self._is_ready():
                raise _Reject(_RECOVERING.code, _RECOVERING.text)
            self._schema.validate(method, params)
            return handler(params)
        except _Reject:
            raise
        except InvalidParams as e:
            raise _Reject(INVALID_PARAMS, e.message) from None
        except VmhostError as e:
            log.info("%s failed: %s (code %d)", method, e.text, e.code)
            raise _Reject(e.code, e.text) from None
        except Exception:
            log.exception("internal error in %s", method)
            raise _Reject(_INTERNAL.code, _INTERNAL.text) from None


def encode_error(code: int, message: str, request_id: Any = None) -> bytes:
    """A complete JSON-RPC error response (also used by transports for
    errors found before the body reaches the Dispatcher)."""
    return _encode({"jsonrpc": "2.0", "id": request_id,
                    "error": {"code": code, "message": message}})


def _encode(response: dict[str, Any]) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON and would break clients.
    # ensure_ascii (default) keeps lone surrogates from requests encodable.
    return json.dumps(response, allow_nan=False, separators=(",", ":")).encode("ascii")


def _decode(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Reject(PARSE_ERROR, f"parse error: body is not UTF-8 (bad byte at offset {e.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise _Reject(PARSE_ERROR, f"parse error: {e}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _request_id(request: Any) -> Any:
    if not isinstance(request, dict):
        raise _Reject(INVALID_REQUEST, "invalid request: expected a JSON object")
    if "id" not in request:
        return _NOTIFICATION
    if not _valid_id(request["id"]):
        raise _Reject(INVALID_REQUEST, "invalid request: id must be a string, an integer or null")
    return request["id"]


def _check_envelope(request: dict[str, Any]) -> None:
    if request.get("jsonrpc") != "2.0":
        raise _Reject(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
    if not isinstance(request.get("method"), str):
        raise _Reject(INVALID_REQUEST, 'invalid request: "method" must be a string')
    params = request.get("params", {})
    if isinstance(params, list):
        raise _Reject(INVALID_REQUEST, 'invalid request: positional "params" (an array) are not supported; '
                                       'pass named parameters as an object')
    if not isinstance(params, dict):
        raise _Reject(INVALID_REQUEST, 'invalid request: "params" must be an object')
