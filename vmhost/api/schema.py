"""The API schema: which verbs exist and what parameters each accepts.

schema.yaml is the single source of truth; this module loads it once, checks
that it is well formed, and validates call parameters against it with
jsonschema, turning jsonschema's errors into short messages that name the
offending field by its path (e.g. ``vmParams.devices[0].imageID``).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmhost.fsutil import atomic_write

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

# jsonschema is imported on the first validation, not at start-up: it is a
# quarter of the agent's imports (~80 ms before the API can answer), and the
# calls that arrive first (Host.getVMList, getAllVmStats) take no parameters.

log = logging.getLogger(__name__)

_VERB_NAME = re.compile(r"^[A-Z][A-Za-z]*\.[a-z][A-Za-z0-9]*$")  # Host.ping2 has a digit
_SHOW_LIMIT = 60  # never echo a huge value back into an error message


class InvalidParams(ValueError):
    """Parameters do not match the schema; the message names the field."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UnknownVerb(LookupError):
    def __init__(self, verb: str):
        super().__init__(f"unknown method {_show(verb)}")
        self.verb = verb


class SchemaError(ValueError):
    """schema.yaml itself is malformed (a bug in vmhost, caught at load)."""


@dataclass(frozen=True)
class VerbSpec:
    name: str
    description: str
    params: Mapping[str, Any]          # name -> JSON Schema (may hold $ref)
    required: tuple[str, ...]
    returns: Mapping[str, Any]
    allowed_while_recovering: bool


class Schema:
    def __init__(self, document: Mapping[str, Any], check: bool = True):
        self._defs: Mapping[str, Any] = document.get("$defs", {})
        self._specs: dict[str, VerbSpec] = {}
        self._validators: dict[str, Any] = {}
        schemas = {}
        for name, entry in document.get("verbs", {}).items():
            spec = _parse_verb(name, entry)
            self._specs[name] = spec
            schemas[name] = {"type": "object", "properties": dict(spec.params),
                             "required": list(spec.required), "additionalProperties": False}
        # One meta-schema check of everything; validators are then built on a
        # verb's first use. The shipped schema skips it (`check=False`, ~40 ms
        # of every agent start): a unit test runs it on every change instead.
        if check:
            import jsonschema
            try:
                _validator_class().check_schema({"$defs": self._defs, "properties": schemas})
            except jsonschema.SchemaError as e:
                path = list(e.absolute_path)
                where = path[1] if len(path) > 1 and path[0] == "properties" else "$defs"
                raise SchemaError(f"{where}: {e.message}") from None
        self._schemas = schemas

    @classmethod
    def from_yaml(cls, text: str, check: bool = True) -> Schema:
        return cls(_parse_yaml(text), check)

    def verbs(self) -> list[str]:
        return sorted(self._specs)

    def has(self, verb: str) -> bool:
        return verb in self._specs

    def spec(self, verb: str) -> VerbSpec:
        try:
            return self._specs[verb]
        except KeyError:
            raise UnknownVerb(verb) from None

    def allowed_while_recovering(self, verb: str) -> bool:
        return self.spec(verb).allowed_while_recovering

    def validate(self, verb: str, params: Any) -> None:
        """Raise InvalidParams (naming the field) unless params fit `verb`."""
        if params == {} and verb in self._schemas and not self._schemas[verb]["required"]:
            return   # no parameters where none is required: valid, and no validator needed
        validator = self._validators.get(verb)
        if validator is None:
            if verb not in self._schemas:
                raise UnknownVerb(verb)
            validator = self._validators[verb] = _validator_class()(
                {"$defs": self._defs, **self._schemas[verb]})
        # iter_errors yields in schema order; the first error is enough for
        # the caller to fix, and keeps the message short.
        error = next(iter(validator.iter_errors(params)), None)
        if error is not None:
            raise InvalidParams(_describe(error))

    def param_schema(self, verb: str, name: str) -> Mapping[str, Any] | None:
        """The schema of one parameter with $refs resolved, or None if the
        verb has no such parameter."""
        node = self.spec(verb).params.get(name)
        return None if node is None else self._resolve(node)

    def _resolve(self, node: Mapping[str, Any]) -> Mapping[str, Any]:
        # Sibling keys of a $ref (description, title) refine the target.
        while "$ref" in node:
            target = self._defs[node["$ref"].removeprefix("#/$defs/")]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return node


@functools.cache
def load_schema() -> Schema:
    """The schema shipped with vmhost, parsed once per process; its
    meta-schema check is tests/unit/test_api_schema.py's job, not every start's."""
    return Schema(_shipped_document(shipped_schema_text()), check=False)


def shipped_schema_text() -> str:
    return importlib.resources.files("vmhost.api").joinpath("schema.yaml").read_text("utf-8")


def _parse_yaml(text: str) -> Any:
    import yaml   # here: the agent's start reads the cached JSON, and never needs it
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _not_json(value: Any) -> str:
    return f"<not JSON: {type(value).__name__}>"   # never equal: the YAML is used


def _shipped_document(text: str) -> Any:
    """schema.yaml parsed, through a JSON copy in __pycache__ named by the
    YAML's digest (as Python caches bytecode): a JSON read instead of
    importing PyYAML and parsing (~30 ms of every agent start). Any trouble
    with the cache falls back to the YAML."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    cache = os.path.join(os.path.dirname(__file__), "__pycache__", f"schema.{digest}.json")
    try:
        with open(cache, "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    document = _parse_yaml(text)
    data = json.dumps(document, separators=(",", ":"), default=_not_json)
    if json.loads(data) != document:   # e.g. an integer key: JSON would change it
        return document
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        atomic_write(cache, data.encode())
    except OSError as e:   # a read-only install: parsed at each start
        log.debug("cannot cache the API schema as %s: %s", cache, e)
    return document


def _parse_verb(name: str, entry: Mapping[str, Any]) -> VerbSpec:
    if not _VERB_NAME.match(name):
        raise SchemaError(f"verb name {name!r} is not Namespace.verb")
    unknown = set(entry) - {"description", "params", "required", "returns",
                            "allowedWhileRecovering"}
    if unknown:
        raise SchemaError(f"{name}: unknown keys {sorted(unknown)}")
    if not entry.get("description"):
        raise SchemaError(f"{name}: missing description")
    params = entry.get("params") or {}
    required = tuple(entry.get("required") or ())
    missing = [r for r in required if r not in params]
    if missing:
        raise SchemaError(f"{name}: required {missing} not in params")
    return VerbSpec(
        name=name,
        description=entry["description"],
        params=params,
        required=required,
        returns=entry.get("returns") or {},
        allowed_while_recovering=bool(entry.get("allowedWhileRecovering", False)),
    )


# --- jsonschema dialect -----------------------------------------------------

def _is_integer(checker: Any, instance: Any) -> bool:
    # Draft 2020-12 counts 1.0 as an integer; a float would then reach
    # services (e.g. "512.0" in domain XML), so only real ints qualify.
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.cache
def _compile(pattern: str) -> re.Pattern[str]:
    # JSON Schema patterns are ECMA-262, where "$" means end of input; in
    # Python it also matches before a final newline, which would let
    # "<uuid>\n" pass. All our patterns anchor with a trailing "$".
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterable[ValidationError]:
    if validator.is_type(instance, "string") and not _compile(pattern).search(instance):
        from jsonschema.exceptions import ValidationError
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@functools.cache
def _validator_class() -> Any:
    """Our dialect of Draft 2020-12, built (and jsonschema imported) on first use."""
    import jsonschema.validators
    base = jsonschema.validators.Draft202012Validator
    return jsonschema.validators.extend(
        base, validators={"pattern": _pattern},
        type_checker=base.TYPE_CHECKER.redefine("integer", _is_integer))


# --- messages ---------------------------------------------------------------

def _describe(error: ValidationError) -> str:
    path = _path(error.absolute_path)
    if error.validator == "required":
        missing = next(r for r in error.validator_value if r not in error.instance)
        return f"missing required parameter {_show(_join(path, missing))}"
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = next(k for k in error.instance if k not in known)
        return f"unknown parameter {_show(_join(path, extra))}"
    where = path or "params"
    value = _show(error.instance)
    title = error.schema.get("title")
    if error.validator in ("enum", "const"):
        allowed = error.validator_value if error.validator == "enum" else [error.validator_value]
        noun = f"a valid {title}" if title else "allowed"
        return f"{where}: {value} is not {noun} (expected one of {', '.join(map(_show, allowed))})"
    if title:
        return f"{where}: {value} is not a valid {title}"
    return f"{where}: {_detail(error, value)}"


def _detail(error: ValidationError, value: str) -> str:
    v = error.validator_value
    match error.validator:
        case "type":
            wanted = " or ".join(v) if isinstance(v, list) else v
            got = "null" if error.instance is None else f"{_json_type(error.instance)} {value}"
            return f"expected {wanted}, got {got}"
        case "minimum":
            return f"{value} is less than the minimum {v}"
        case "maximum":
            return f"{value} is greater than the maximum {v}"
        case "minLength":
            return f"{value} is too short (at least {_count(v, 'character')})"
        case "maxLength":
            return f"{value} is too long (at most {_count(v, 'character')})"
        case "minItems":
            return f"must have at least {_count(v, 'item')}"
        case "maxItems":
            return f"must have at most {_count(v, 'item')}"
        case "pattern":
            return f"{value} does not match {v!r}"
        case "anyOf" | "oneOf":
            return f"{value} does not match any allowed form"
    return error.message[:200]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _path(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _SHOW_LIMIT else text[:_SHOW_LIMIT - 3] + "..."
