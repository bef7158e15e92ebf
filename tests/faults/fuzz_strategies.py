"""Hypothesis strategies for fuzzing the vmhost JSON-RPC API, derived from
vmhost/api/schema.yaml (nothing about the verbs is written here by hand
except which real objects an ID field may name).

What `Fuzz(world).request()` draws, one HTTP request at a time:

* valid      params built from the verb's JSON Schema: $ref, const, enum,
             pattern, anyOf, type lists, minimum/maximum, lengths, required,
             additionalProperties, if/then. UUIDs are random, blank, or the
             IDs of real objects (`World`: the storage domain, images,
             volumes, the running VM, merge jobs), sometimes as coherent
             (domain, image, volume) triples or VM chains, so that calls get
             past "does not exist" into the services;
* invalid    a valid request with one mutation somewhere in its tree: a
             required key dropped, an unknown key, a wrong JSON type, a bad
             UUID ('../', upper case, trailing newline, ...), an over-long or
             huge string, nested junk, odd unicode, a number out of range, an
             enum miss;
* envelope   wrong "jsonrpc", odd or invalid ids, notifications, unknown or
             non-string methods, non-object params, extra members;
* batch      lists mixing all of the above (and non-objects, empty lists);
* raw        bytes that are not (quite) JSON: binary, truncated, bad UTF-8,
             NaN, BOM, trailing garbage, 5000-digit numbers, deep nesting;
* http       HTTP-level oddities: wrong Content-Type, wrong method or path,
             chunked body, a body over the size limit.

Everything is sent only after `make_safe` (the last step, on the exact body
bytes): a request the agent would execute -- its params pass the schema -- is
rewritten when it could hurt the fixture or the host: StorageDomain.create
only inside the sandbox (and only a few of them), VM names carry the
session's prefix and memory is small, the fixture VM is never destroyed or
paused, fixture volumes are never deleted, preallocation stays small, and
only so many VMs get started (World.vm_start_budget).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.resources
import json
import os
import string
import uuid
from typing import Any

import jsonschema
import yaml
from hypothesis import strategies as st

from vmhost.api.schema import InvalidParams, UnknownVerb, load_schema

MiB = 1 << 20
GiB = 1 << 30
BLANK_UUID = "00000000-0000-0000-0000-000000000000"

DOCUMENT: dict = yaml.safe_load(
    importlib.resources.files("vmhost.api").joinpath("schema.yaml").read_text("utf-8"))
DEFS: dict = DOCUMENT.get("$defs", {})
VERBS: list[str] = sorted(DOCUMENT["verbs"])
SCHEMA = load_schema()

# ID fields -> the kind of real object they name.
UUID_KIND = {
    "storagedomainID": "domain", "domainID": "domain", "domains": "domain",
    "imageID": "image", "srcImgUUID": "image",
    "volumeID": "volume", "srcVolUUID": "volume", "leafVolID": "volume",
    "baseVolumeID": "volume", "baseVolUUID": "volume", "topVolUUID": "volume",
    "vmID": "vm", "vmId": "vm", "vmList": "vm",
    "jobUUID": "job",
    "storagepoolID": "pool", "poolID": "pool",
}

# Limits that keep executed requests kind to a small shared host.
MAX_MEM_MIB = 256              # VM.create memSize above this is lowered
MAX_PREALLOCATED = 256 * MiB   # PREALLOCATED volumes above this become SPARSE

BAD_UUIDS = [
    "", " ", "..", "../", "../..", "../../etc/passwd", "/etc/passwd", ".", "/",
    "..%2f..%2f", "%2e%2e%2f", "....//....//", "./././", "~", "~root",
    "not-a-uuid", "00000000-0000-0000-0000-00000000000", "00000000-0000-0000-0000-0000000000000",
    "00000000-0000-0000-0000-00000000000g", "00000000_0000_0000_0000_000000000000",
    "0000000000000000000000000000000000000", "{00000000-0000-0000-0000-000000000000}",
    "urn:uuid:00000000-0000-0000-0000-000000000000", "ABCDEFAB-ABCD-ABCD-ABCD-ABCDEFABCDEF",
    "00000000-0000-0000-0000-000000000000\n", "00000000-0000-0000-0000-000000000000\x00",
    " 00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000000 ",
    "00000000-0000-0000-0000-000000000000/../x", "../00000000-0000-0000-0000-000000000000",
    "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668-0000-0000-0000-000000000000",
    "\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10-0000-0000-0000-000000000000",
    "00000000\u20100000\u20100000\u20100000\u2010000000000000",
    "$(reboot)", "`id`", "'; DROP TABLE vms; --", "<xml/>", "]]>", "${jndi:ldap://x}",
    "\ud800", "\udfff", "\U0001f600", "\u202e", "null", "None", "true", "0", "-1",
]
# Everything some line-oriented reader splits on (str.splitlines: \n \r \x0b
# \x0c \x1c-\x1e \x85 \u2028 \u2029), and free text that tries to set a volume
# metadata key through desc or diskType (they must round-trip or be refused).
LINE_SEPARATORS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
                   "\u2028", "\u2029"]
METADATA_PAYLOADS = [
    *(f"x{sep}CAP=1" for sep in LINE_SEPARATORS),
    *(f"{sep}LEGALITY=ILLEGAL{sep}PUUID={BLANK_UUID}{sep}EOF{sep}" for sep in LINE_SEPARATORS),
    "VOLTYPE=INTERNAL", "DESCRIPTION=", "CAP=1", "%", "%0A", "%25", "%E2%80%A8", "%zz",
    "\x00=\x00", "\u2028" * 210, "\x85" * 32,
]
METADATA_TEXT_FIELDS = ("desc", "diskType")
SPECIAL_STRINGS = BAD_UUIDS + LINE_SEPARATORS + METADATA_PAYLOADS + [
    "\x00", "a\x00b", "\n", "\r\n", "\t", "\x7f", "\x1b[31m", "=", "KEY=value\nEOF\n",
    "PUUID=00000000-0000-0000-0000-000000000000", "EOF", "\ufeff", "\u0000\u0000",
    "\U0010ffff", "\uffff", "\ufffe", "e\u0301", "\u0130", "\u00df",
    "%s%s%s%n", "{}", "[]", "\\", "\\u0000", "\"", "'", "<disk/>", "</name><evil/>",
    "&amp;", "&#0;", "A" * 65, "A" * 211, "A" * 4097,
]
UNKNOWN_KEYS = ["foo", "", " ", "__proto__", "constructor", "$ref", "id", "jsonrpc", "params",
                "method", "\x00", "a.b", "../x", "vmid", "VMID", "storageDomainID", "\ud800",
                "\U0001f600", "k" * 300]


# --- the real objects requests may name ---------------------------------------

@dataclasses.dataclass
class World:
    """What exists on the agent right now; the test keeps it current."""
    sandbox: str                       # StorageDomain.create may only point in here
    vm_prefix: str                     # every VM a request may start is named so
    domains: list[str] = dataclasses.field(default_factory=list)
    triples: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # sd, img, vol
    vms: list[str] = dataclasses.field(default_factory=list)
    vm_drives: dict[str, list[tuple[str, str, list[str]]]] = dataclasses.field(default_factory=dict)
    jobs: list[str] = dataclasses.field(default_factory=list)
    parents: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)  # (img, vol) -> parent
    protected_vms: set[str] = dataclasses.field(default_factory=set)
    protected_volumes: set[str] = dataclasses.field(default_factory=set)
    max_domains: int = 4               # fuzzer-created domains beyond this are refused
    fixture_domains: int = 1
    vm_start_budget: int = 0           # VMs requests may still start (the test keeps it)

    def ids(self, kind: str) -> list[str]:
        if kind == "domain":
            return self.domains
        if kind == "image":
            return sorted({t[1] for t in self.triples})
        if kind == "volume":
            return [t[2] for t in self.triples]
        if kind == "vm":
            return self.vms
        if kind == "job":
            return self.jobs
        return []

    def pick(self, kind: str, i: int) -> str | None:
        ids = self.ids(kind)
        return ids[i % len(ids)] if ids else None

    def volumes_of(self, img: str) -> list[str]:
        return [t[2] for t in self.triples if t[1] == img]

    def fresh_name(self, suffix: str) -> str:
        return self.vm_prefix + suffix


# --- JSON Schema helpers ------------------------------------------------------

def ref_chain(node: dict) -> list[str]:
    """Names of the $defs a node reaches through $ref (outermost first)."""
    names = []
    while isinstance(node, dict) and "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        names.append(name)
        node = DEFS[name]
    return names


def resolve(node: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        target = DEFS[node["$ref"].removeprefix("#/$defs/")]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def verb_node(verb: str) -> dict:
    spec = SCHEMA.spec(verb)
    return {"type": "object", "properties": dict(spec.params), "required": list(spec.required),
            "additionalProperties": False}


_VALIDATORS: dict[str, Any] = {}


def matches(node: dict, value: Any) -> bool:
    key = json.dumps(node, sort_keys=True)
    validator = _VALIDATORS.get(key)
    if validator is None:
        validator = _VALIDATORS[key] = jsonschema.Draft202012Validator({"$defs": DEFS, **node})
    return validator.is_valid(value)


def params_valid(verb: Any, params: Any) -> bool | None:
    """Would the agent's own validator let these params through to the
    service? None: the validator itself failed here (RecursionError on absurd
    nesting, whose depth limit depends on the caller's stack)."""
    if not isinstance(verb, str) or not SCHEMA.has(verb):
        return False
    try:
        SCHEMA.validate(verb, params)
    except (InvalidParams, UnknownVerb):
        return False
    except Exception:
        return None
    return True


# --- raw byte splices -----------------------------------------------------------

class Raw:
    """Bytes spliced verbatim into an encoded body (deep nesting, 5000-digit
    numbers, NaN): things json.dumps cannot or will not write."""

    def __init__(self, data: bytes):
        self.data = data

    def __repr__(self) -> str:
        return f"Raw({self.data[:40]!r}{'...' if len(self.data) > 40 else ''}, {len(self.data)} bytes)"


_RAW_TOKEN = "\x00\x01vmhost-fuzz-raw-{}\x01\x00"


def encode(message: Any) -> bytes:
    raws: list[bytes] = []

    def default(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o.data)
            return _RAW_TOKEN.format(len(raws) - 1)
        raise TypeError(f"cannot encode {type(o).__name__}")

    out = json.dumps(message, default=default, separators=(",", ":")).encode("ascii")
    for i, data in enumerate(raws):
        out = out.replace(json.dumps(_RAW_TOKEN.format(i)).encode("ascii"), data, 1)
    return out


# --- the request the test sends ---------------------------------------------------

@dataclasses.dataclass
class FuzzRequest:
    category: str                       # valid | invalid | envelope | batch | raw | http
    body: bytes
    verb: str | None = None             # the verb it is about, when there is one
    http_method: str = "POST"
    path: str = "/jsonrpc"
    content_type: str | None = "application/json"
    chunked: bool = False

    @property
    def http_junk(self) -> bool:
        return (self.http_method != "POST" or self.path != "/jsonrpc" or self.chunked
                or self.content_type != "application/json")


# --- strategies --------------------------------------------------------------------

def _memo(method):
    """Build each strategy once per (node, name): strategies read the World
    lazily at draw time, and building them (st.composite especially) is far
    slower than drawing from them."""
    def wrapper(self, *args):
        key = (method.__name__, json.dumps(args, sort_keys=True, default=repr))
        strategy = self._cache.get(key)
        if strategy is None:
            strategy = self._cache[key] = method(self, *args)
        return strategy
    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _weighted(draw, *choices: tuple[int, Any]) -> Any:
    total = sum(w for w, _ in choices)
    r = draw(st.integers(0, total - 1))
    for w, value in choices:
        if r < w:
            return value
        r -= w
    raise AssertionError("unreachable")


class Fuzz:
    def __init__(self, world: World):
        self.world = world
        self._cache: dict[tuple[str, str], st.SearchStrategy] = {}

    # --- leaves ---------------------------------------------------------------

    @_memo
    def text(self, min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[str]:
        specials = [s for s in SPECIAL_STRINGS if min_size <= len(s) <= max_size]
        options = [st.text(min_size=min_size, max_size=min(max_size, 40)),
                   st.text(alphabet=string.ascii_letters + string.digits + "._-",
                           min_size=min_size, max_size=min(max_size, 40))]
        if max_size <= 300:
            options.append(st.just("x" * max_size))     # exactly at the limit
        if specials:
            options.append(st.sampled_from(specials))
        return st.one_of(options)

    @_memo
    def metadata_text(self, min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[str]:
        """Free text aimed at the volume metadata file: separators, '=',
        '%' and key payloads, alone or mixed with ordinary text."""
        pieces = st.one_of(st.sampled_from(LINE_SEPARATORS + ["=", "%", "\x00", "CAP=1", "EOF"]),
                           st.text(max_size=6))
        payloads = [p for p in METADATA_PAYLOADS if min_size <= len(p) <= max_size]
        mixed = st.lists(pieces, max_size=8).map("".join).filter(
            lambda s: min_size <= len(s) <= max_size)
        return st.one_of(st.sampled_from(payloads), mixed) if payloads else mixed

    @_memo
    def huge_string(self) -> st.SearchStrategy[str]:
        return st.builds(lambda n, c: c * n, st.integers(300, 300_000),
                         st.sampled_from(["x", "/", ".", "\u00e9", "\U0001f600", "\x00", "a/../"]))

    @_memo
    def key(self) -> st.SearchStrategy[str]:
        return st.one_of(st.sampled_from(UNKNOWN_KEYS), st.text(max_size=12))

    @_memo
    def deep(self) -> st.SearchStrategy[Raw]:
        """Nesting the agent's JSON parser cannot (>= 2000) or can (<= 400) take.
        The zone in between is avoided: whether it parses depends on the stack
        depth of the parser's caller, which differs between here and the agent."""
        depth = st.one_of(st.sampled_from([2, 50, 400]), st.integers(2000, 150_000))
        return st.builds(lambda d, kind: Raw(
            b"[" * d + b"]" * d if kind == 0 else
            b'{"a":' * d + b"1" + b"}" * d if kind == 1 else
            b"[{" * (d // 2) + b"}]" * (d // 2) if d >= 2000 else b'[{"k":' * (d // 2) + b"0" + b"}]" * (d // 2)),
            depth, st.integers(0, 2))

    @_memo
    def junk(self) -> st.SearchStrategy[Any]:
        leaves = st.one_of(
            st.none(), st.booleans(), st.integers(),
            st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
            st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30]),
            st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from([0.0, -0.0, 1.0, 1.5, 1e308, -1e308, 5e-324]),
            self.text(), st.sampled_from(SPECIAL_STRINGS))
        nested = st.recursive(leaves, lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(self.key(), children, max_size=4)), max_leaves=8)
        return st.one_of(nested, nested, nested, self.huge_string(), self.deep())

    @_memo
    def uuid(self, name: str | None) -> st.SearchStrategy[str]:
        kind = UUID_KIND.get(name or "", "")

        @st.composite
        def draw_uuid(draw):
            # The same draws whatever the World holds (see _cohere).
            i = draw(st.integers(0, 2 ** 16))
            choice = _weighted(draw, (5, "random"), (6, "real"), (1, "blank"), (1, "edge"))
            random_uuid = str(draw(st.uuids()))
            if choice == "real":
                return self.world.pick(kind, i) or random_uuid
            if choice == "blank":
                return BLANK_UUID
            if choice == "edge":
                return ("ffffffff-ffff-ffff-ffff-ffffffffffff", "00000000-0000-0000-0000-000000000001",
                        "12345678-1234-1234-1234-123456789abc")[i % 3]
            return random_uuid
        return draw_uuid()

    @_memo
    def bad_uuid(self) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.sampled_from(BAD_UUIDS),
            st.uuids().map(lambda u: str(u).upper()),
            st.uuids().map(lambda u: str(u) + "\n"),
            st.uuids().map(lambda u: u.hex),
            st.uuids().map(lambda u: "../" + str(u)),
            st.uuids().map(lambda u: str(u)[:-1]),
            st.uuids().map(lambda u: str(u) + "0"),
            st.builds(lambda i: "../" + (self.world.pick("volume", i) or BLANK_UUID), st.integers(0, 2 ** 16)),
            self.huge_string(),
            self.wrong_type({"type": "string"}))

    @_memo
    def byte_size(self) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.sampled_from([1, 512, 4096, MiB, 64 * MiB, 64 * MiB + 1, GiB, 10 * GiB]),
            st.integers(1, 128 * MiB),
            st.sampled_from(["1", "67108864", "0067108864", "1073741824", "99999999999999999999",
                             str(2 ** 63), str(2 ** 64), "18446744073709551615"]),
            st.integers(1, 128 * MiB).map(str),
            st.sampled_from([2 ** 40, 2 ** 44 + 1, 2 ** 53, 2 ** 63, 2 ** 64, 10 ** 30]))

    @_memo
    def abs_path(self) -> st.SearchStrategy[str]:
        sandbox = self.world.sandbox
        return st.one_of(
            st.just(sandbox), st.just(sandbox + "/"), st.just(sandbox + "//."),
            st.builds(lambda s: f"{sandbox}/{s}", st.text(
                alphabet=string.ascii_letters + string.digits + "._- ", min_size=1, max_size=20)),
            st.sampled_from(["/", "/etc", "/proc/self", "/dev/null", "/var/tmp", "/nonexistent/dir",
                             "/tmp/x\x7fy", "/a/./b", "/a/b/..x", "/" + "d" * 4000]),
            st.text(max_size=30).map(lambda s: "/" + s.replace("\x00", "").replace("\n", "")))

    @_memo
    def vm_name(self) -> st.SearchStrategy[str]:
        room = 64 - len(self.world.vm_prefix)
        return st.text(alphabet=string.ascii_letters + string.digits + "._-", max_size=room).map(
            self.world.fresh_name)

    # --- valid values from a schema node -------------------------------------------

    @_memo
    def valid(self, node: dict, name: str | None = None) -> st.SearchStrategy[Any]:
        refs = ref_chain(node)
        if "UUIDList" in refs:
            return st.lists(self.uuid(name), max_size=4)
        if "UUID" in refs:
            return self.uuid(name)
        if "AbsolutePath" in refs:
            return self.abs_path()
        if "VmName" in refs:
            return self.vm_name()
        if "ByteSize" in refs:
            return self.byte_size()
        node = resolve(node)
        if name == "memSize":
            lo, hi = node.get("minimum", 16), node.get("maximum", 65536)
            return st.one_of(st.sampled_from([lo, lo + 1, 64, 128, hi - 1, hi]), st.integers(lo, hi))
        if name == "device" and node.get("type") == "string":
            return st.one_of(st.sampled_from(["disk", "disk", "disk", "cdrom", "interface",
                                              "memballoon", "graphics", "vda"]),
                             self.text(node.get("minLength", 0), node.get("maxLength", 32)))
        if "const" in node:
            return st.just(node["const"])
        if "enum" in node:
            return st.sampled_from(node["enum"])
        if "anyOf" in node:
            return st.one_of([self.valid(sub, name) for sub in node["anyOf"]])
        kind = node.get("type")
        if isinstance(kind, list):
            return st.one_of([self.valid({**node, "type": k}, name) for k in kind])
        if kind == "object":
            return self.valid_object(node)
        if kind == "array":
            lo = node.get("minItems", 0)
            hi = max(lo, min(node.get("maxItems", 3), 3))
            return st.lists(self.valid(node.get("items", {}), name), min_size=lo, max_size=hi)
        if kind == "integer":
            lo, hi = node.get("minimum"), node.get("maximum")
            edges = [v for v in (lo, hi, 0, 1, -1, 2 ** 31, 2 ** 63)
                     if v is not None and (lo is None or v >= lo) and (hi is None or v <= hi)]
            return st.one_of(st.sampled_from(edges), st.integers(lo, hi))
        if kind == "number":
            return st.floats(node.get("minimum"), node.get("maximum"), allow_nan=False,
                             allow_infinity=False)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "string":
            lo, hi = node.get("minLength", 0), node.get("maxLength", 40)
            if name in METADATA_TEXT_FIELDS:
                return st.one_of(self.metadata_text(lo, hi), self.text(lo, hi))
            if "pattern" in node:
                return st.from_regex(node["pattern"], fullmatch=True).filter(
                    lambda s: lo <= len(s) <= hi and matches(node, s))
            return self.text(lo, hi)
        return self.junk()    # no type: anything goes

    @_memo
    def valid_object(self, node: dict) -> st.SearchStrategy[dict]:
        props: dict = node.get("properties", {})
        required: list = node.get("required", [])
        extra_ok = node.get("additionalProperties", True) is not False

        @st.composite
        def draw_object(draw):
            out = {}
            for key, sub in props.items():
                if key in required or draw(st.integers(0, 2)) == 0:
                    out[key] = draw(self.valid(sub, key))
            if extra_ok and draw(st.integers(0, 3)) == 0:
                for key, value in draw(st.dictionaries(self.key(), self.junk(), max_size=3)).items():
                    if key not in props:
                        out[key] = value
            if "if" in node and "then" in node and matches(node["if"], out):
                for key in node["then"].get("required", []):
                    if key not in out:
                        out[key] = draw(self.valid(props[key], key))
            return out
        return draw_object()

    # --- invalid values -------------------------------------------------------------

    @_memo
    def wrong_type(self, node: dict) -> st.SearchStrategy[Any]:
        node = resolve(node)
        allowed = node.get("type")
        allowed = set(allowed if isinstance(allowed, list) else [allowed] if allowed else [])
        samples = {
            "null": st.none(), "boolean": st.booleans(),
            "integer": st.sampled_from([0, 1, -1, 64, 2 ** 64]),
            "number": st.sampled_from([1.0, 0.5, -2.5, 1e300, 64.0]),
            "string": st.one_of(st.sampled_from(["", "1", "64", "true", "null", "COW"]), self.text()),
            "array": st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
            "object": st.dictionaries(self.key(), st.integers(), max_size=2),
        }
        options = [s for t, s in samples.items() if t not in allowed]
        return st.one_of(options) if options else self.junk()

    @_memo
    def invalid(self, node: dict, name: str | None = None) -> st.SearchStrategy[Any]:
        """Values that (mostly) violate `node`; the caller checks against the
        schema to know which ones really do."""
        refs = ref_chain(node)
        if "UUIDList" in refs:
            return st.one_of(self.wrong_type({"type": "array"}),
                             st.lists(self.bad_uuid(), min_size=1, max_size=3),
                             st.builds(lambda good, bad: good + [bad],
                                       st.lists(self.uuid(name), max_size=3), self.bad_uuid()))
        if "UUID" in refs:
            return self.bad_uuid()
        node = resolve(node)
        options = [self.wrong_type(node), self.junk()]
        if "ByteSize" in refs:
            options.append(st.sampled_from([0, -1, -(2 ** 63), "0", "000", "-5", "", " 1", "1 ",
                                            "1.5", "1e3", "0x10", "+1", "١", "1" * 21,
                                            "9" * 21, 1.0, 1.5, True, None, [], {}]))
        if "enum" in node or "const" in node:
            allowed = node.get("enum", [node.get("const")])
            near = []
            for a in allowed:
                if isinstance(a, str):
                    near += [a.lower(), a.upper() + "2", a + " ", " " + a, a + "\n", a[:-1], a * 2]
                elif isinstance(a, int):
                    near += [a - 1, a + 1, str(a), float(a), -a]
            options.append(st.sampled_from([n for n in near if n not in allowed] or ["?"]))
        kind = node.get("type")
        kinds = set(kind if isinstance(kind, list) else [kind])
        if "integer" in kinds:
            lo, hi = node.get("minimum"), node.get("maximum")
            out = [1.5, True, False, "1"]
            if lo is not None:
                out += [lo - 1, lo - 2 ** 64, float(lo)]
            if hi is not None:
                out += [hi + 1, hi + 2 ** 64, float(hi)]
            options.append(st.sampled_from(out))
        if "string" in kinds:
            lo, hi = node.get("minLength", 0), node.get("maxLength")
            if hi is not None:
                options.append(st.builds(lambda c, extra: c * (hi + extra), st.sampled_from(["x", "\u00e9", "/"]),
                                         st.sampled_from([1, 2, 1000])))
            if lo > 0:
                options.append(st.just(""))
            if "pattern" in node:
                options.append(st.sampled_from(SPECIAL_STRINGS))
            options.append(self.huge_string())
        if "array" in kinds:
            if node.get("minItems"):
                options.append(st.just([]))
            if "items" in node:
                options.append(st.lists(self.invalid(node["items"], name), min_size=1, max_size=2))
        if "object" in kinds:
            options.append(self.invalid_object(node))
            options.append(self.invalid_object(node))
        return st.one_of(options)

    @_memo
    def invalid_object(self, node: dict) -> st.SearchStrategy[dict]:
        props: dict = node.get("properties", {})
        required: list = node.get("required", [])
        closed = node.get("additionalProperties", True) is False

        @st.composite
        def draw_object(draw):
            out = draw(self.valid_object(node))
            moves = [(3 if props else 0, "bad-value"), (2 if required else 0, "drop-required"),
                     (2 if closed else 0, "unknown-key"), (1, "replace-all")]
            move = _weighted(draw, *moves)
            if move == "drop-required":
                out.pop(draw(st.sampled_from(required)), None)
            elif move == "unknown-key":
                key = draw(self.key().filter(lambda k: k not in props))
                out[key] = draw(self.junk())
            elif move == "bad-value":
                key = draw(st.sampled_from(sorted(props)))
                out[key] = draw(self.invalid(props[key], key))
            else:
                out = draw(st.dictionaries(self.key(), self.junk(), max_size=4))
            return out
        return draw_object()

    # --- params for a verb ----------------------------------------------------------

    @_memo
    def valid_params(self, verb: str) -> st.SearchStrategy[dict]:
        @st.composite
        def draw_params(draw):
            params = draw(self.valid_object(verb_node(verb)))
            if draw(st.integers(0, 9)) < 6:
                self._cohere(draw, verb, params)
            return params
        return draw_params()

    @_memo
    def invalid_params(self, verb: str) -> st.SearchStrategy[dict]:
        @st.composite
        def draw_params(draw):
            params = draw(self.valid_params(verb))
            node = verb_node(verb)
            props, required = node["properties"], node["required"]
            move = _weighted(draw, (5 if props else 0, "bad-value"),
                             (2 if required else 0, "drop-required"), (2, "unknown-key"),
                             (1, "junk-params"))
            if move == "bad-value":
                key = draw(st.sampled_from(sorted(props)))
                params[key] = draw(self.invalid(props[key], key))
            elif move == "drop-required":
                params.pop(draw(st.sampled_from(required)), None)
            elif move == "unknown-key":
                params[draw(self.key().filter(lambda k: k not in props))] = draw(self.junk())
            else:
                params = draw(st.dictionaries(self.key(), self.junk(), min_size=1, max_size=4))
            return params
        return draw_params()

    def _cohere(self, draw, verb: str, p: dict) -> None:
        """Make the IDs of a valid request name real objects that belong
        together, so that the call reaches the service's deeper checks.

        Every random choice is drawn first, the same ones whatever the World
        holds, and only then applied to it: Hypothesis replays choice
        sequences and insists that a sequence always leads to the same draws."""
        w = self.world
        r = draw(st.tuples(*[st.integers(0, 2 ** 16)] * 8))
        fresh = str(draw(st.uuids()))
        fresh_image = str(draw(st.uuids()))
        mode = draw(st.integers(0, 3))
        flag = draw(st.booleans())
        size = draw(st.sampled_from([64 * MiB, 64 * MiB, "67108864", GiB, MiB]))

        if verb == "Volume.create":   # often hostile free text (see METADATA_PAYLOADS)
            text = draw(st.tuples(st.integers(0, 3), self.metadata_text(0, 210),
                                  self.metadata_text(1, 32)))
            if text[0] & 1:
                p["desc"] = text[1]
            if text[0] == 3:
                p["diskType"] = text[2]

        def pick(seq, k):
            return seq[r[k] % len(seq)] if seq else None

        triple = pick(w.triples, 0)
        if verb in ("Volume.getInfo", "Volume.delete") and triple:
            p.update(storagedomainID=triple[0], imageID=triple[1], volumeID=triple[2])
        elif verb == "Image.reconcileVolumeChain" and triple:
            p.update(storagedomainID=triple[0], imageID=triple[1], leafVolID=triple[2])
        elif verb == "StorageDomain.getVolumes" and triple:
            p.update(storagedomainID=triple[0], imageID=triple[1])
        elif verb == "StorageDomain.getInfo" and w.domains:
            p["storagedomainID"] = pick(w.domains, 1)
        elif verb == "StorageDomain.create":
            p["typeArgs"] = w.sandbox
            p["storagedomainID"] = (pick(w.domains, 1) if mode == 0 else None) or fresh
        elif verb == "Volume.create" and w.domains:
            p.update(storagedomainID=pick(w.domains, 1), volumeID=fresh)
            drive = pick([d for drives in w.vm_drives.values() for d in drives], 2)
            if mode == 3 and drive:       # a child of a VM's leaf: ready for VM.snapshot
                triple = (drive[0], drive[1], drive[2][-1])
            if mode >= 2 and triple:      # a child of a real volume
                p.update(storagedomainID=triple[0], imageID=triple[1], srcVolUUID=triple[2],
                         volFormat="COW" if flag else 4, size=size)
                if r[6] % 2:
                    p["srcImgUUID"] = triple[1]
                else:
                    p.pop("srcImgUUID", None)
            elif mode == 1 and triple:    # another base volume in a real image
                p.update(storagedomainID=triple[0], imageID=triple[1])
                p.pop("srcVolUUID", None)
                p.pop("srcImgUUID", None)
            else:
                p["imageID"] = fresh_image
        elif verb == "VM.create":
            p["vmID"] = fresh
            used = set()
            for n, dev in enumerate(p["vmParams"].get("devices", [])):
                t = pick(w.triples, 1 + n % 7)
                if dev.get("device") == "disk" and t and (t[0], t[1]) not in used:
                    used.add((t[0], t[1]))
                    dev.update(domainID=t[0], imageID=t[1], volumeID=t[2])
        elif verb in ("VM.snapshot", "VM.merge") and w.vm_drives:
            vm = pick(sorted(w.vm_drives), 1)
            p["vmID"] = vm
            drives = w.vm_drives[vm]
            if not drives:
                return
            sd, img, chain = pick(drives, 2)
            if verb == "VM.snapshot":
                children = [v for v in w.volumes_of(img) if w.parents.get((img, v)) == chain[-1]]
                volume = pick(children if children and mode else w.volumes_of(img), 3)
                p["snapDrives"] = [{"domainID": sd, "imageID": img, "baseVolumeID": chain[-1],
                                    "volumeID": volume or fresh}]
            else:
                a, b = r[4] % len(chain), r[5] % len(chain)
                base, top = (chain[min(a, b)], chain[max(a, b)]) if mode else (chain[a], chain[b])
                p.update(drive={"domainID": sd, "imageID": img, "volumeID": chain[-1]},
                         baseVolUUID=base, topVolUUID=top)
                p.pop("jobUUID", None)
        elif verb in ("VM.abortMerge", "VM.dismissJob"):
            p["vmID"] = pick(w.vms, 1) or p["vmID"]
            p["jobUUID"] = pick(w.jobs, 2) or p["jobUUID"]
        elif verb.startswith("VM.") and "vmID" in p and w.vms:
            p["vmID"] = pick(w.vms, 1)

    # --- whole requests -------------------------------------------------------------

    @_memo
    def request_id(self) -> st.SearchStrategy[Any]:
        return st.one_of(st.integers(0, 2 ** 31), st.integers(0, 2 ** 31),
                         st.text(max_size=12), st.integers(-(2 ** 70), 2 ** 70), st.none())

    @_memo
    def bad_request_id(self) -> st.SearchStrategy[Any]:
        return st.one_of(st.booleans(), st.sampled_from([1.0, 1.5, -0.0, 1e300]),
                         st.lists(st.integers(), max_size=2), st.dictionaries(self.key(), st.integers(), max_size=2))

    @_memo
    def message(self, valid: bool) -> st.SearchStrategy[tuple[str, dict]]:
        @st.composite
        def draw_message(draw):
            verb = draw(st.sampled_from(VERBS))
            params = draw(self.valid_params(verb) if valid else self.invalid_params(verb))
            msg = {"jsonrpc": "2.0", "id": draw(self.request_id()), "method": verb}
            if params or draw(st.integers(0, 3)):
                msg["params"] = params
            return verb, msg
        return draw_message()

    @_memo
    def envelope(self) -> st.SearchStrategy[tuple[str | None, dict]]:
        @st.composite
        def draw_envelope(draw):
            verb, msg = draw(self.message(draw(st.booleans())))
            move = _weighted(draw, (3, "jsonrpc"), (3, "id"), (2, "notification"), (4, "method"),
                             (3, "params"), (1, "extra"), (1, "drop"))
            if move == "jsonrpc":
                bad = draw(st.sampled_from(["1.0", "2", "2.0 ", " 2.0", "2.00", "", "3.0", 2.0, 2, None,
                                            True, ["2.0"], {"v": "2.0"}, "2.0\n", "\uff12.0"]))
                msg["jsonrpc"] = bad
            elif move == "id":
                msg["id"] = draw(self.bad_request_id())
            elif move == "notification":
                del msg["id"]
            elif move == "method":
                msg["method"] = draw(st.one_of(
                    st.sampled_from(["VM.explode", "Foo.bar", "", ".", "VM.", ".create", "host.ping",
                                     "HOST.PING", "Host.ping ", " Host.ping", "Host.ping\n", "Host..ping",
                                     "Host.ping.ping", "__init__", "Host.__class__", "rpc.discover",
                                     "system.listMethods", "Host.ping\x00", "Ηost.ping",
                                     "VM.create/../Host.ping", "M" * 5000]),
                    st.text(max_size=30),
                    st.builds(lambda v: v.lower(), st.sampled_from(VERBS)),
                    st.builds(lambda v: v.swapcase(), st.sampled_from(VERBS)),
                    st.none(), st.integers(), st.booleans(), st.lists(st.just(verb or "x"), max_size=2),
                    st.dictionaries(self.key(), st.integers(), max_size=1)))
            elif move == "params":
                msg["params"] = draw(st.one_of(
                    st.none(), st.booleans(), st.integers(), st.text(max_size=10),
                    st.lists(self.junk(), max_size=3), st.just([]), st.just(""),
                    st.builds(lambda p: list(p.values()), self.valid_params(verb)) if verb else st.just([1])))
            elif move == "extra":
                for key, value in draw(st.dictionaries(
                        st.sampled_from(["extra", "result", "error", "Jsonrpc", "ID", "\x00", "meta"]),
                        self.junk(), min_size=1, max_size=2)).items():
                    msg[key] = value
            else:
                msg.pop(draw(st.sampled_from(["jsonrpc", "method", "params", "id"])), None)
            if draw(st.integers(0, 4)) == 0 and "id" in msg:
                del msg["id"]          # also as a notification
            return verb, msg
        return draw_envelope()

    @_memo
    def batch(self) -> st.SearchStrategy[list]:
        item = st.one_of(
            self.message(True).map(lambda m: m[1]),
            self.message(True).map(lambda m: {k: v for k, v in m[1].items() if k != "id"}),
            self.message(False).map(lambda m: m[1]),
            self.envelope().map(lambda m: m[1]),
            st.sampled_from([1, "x", None, True, [], [1], {}, 1.5, [{"jsonrpc": "2.0"}]]),
        )
        return st.one_of(st.lists(item, min_size=1, max_size=10), st.just([]),
                         st.lists(self.message(True).map(
                             lambda m: {k: v for k, v in m[1].items() if k != "id"}),
                             min_size=1, max_size=3))

    @_memo
    def raw(self) -> st.SearchStrategy[bytes]:
        good = self.message(True).map(lambda m: encode(m[1]))
        return st.one_of(
            st.binary(max_size=200),
            st.sampled_from([b"", b" ", b"\n", b"null", b"1", b'"str"', b"true", b"{}", b"[[]]", b"[1]",
                             b"\xef\xbb\xbf{}", b"{", b"}", b"[", b"]", b'{"jsonrpc":"2.0"', b"{'a': 1}",
                             b'{"jsonrpc":"2.0","id":1,"method":"Host.ping"} x',
                             b'{"jsonrpc":"2.0","id":NaN,"method":"Host.ping"}',
                             b'{"jsonrpc":"2.0","id":1,"method":"Host.ping","params":{"x":Infinity}}',
                             b'{"jsonrpc":"2.0","id":1,"method":"Host.ping"}\x00',
                             b'{"jsonrpc":"2.0","id":1,"method":"Host.ping"}{"jsonrpc":"2.0"}',
                             b'{"jsonrpc":"2.0","id":1,"method":"Host.ping" /* c */}',
                             b'{"jsonrpc":"2.0","id":1,"id":2,"method":"Host.ping"}',
                             b'{"jsonrpc":"2.0","id":1,"method":"Host.ping","method":"VM.explode"}',
                             b'{"jsonrpc":"2.0","id":"\\ud800","method":"Host.ping"}',
                             b'{"jsonrpc":"2.0","id":1,"method":"Host.p\\u0069ng"}',
                             b'{"jsonrpc":"2.0","id":1,"method":"Host.ping","params":{"\\u0000":1}}',
                             b"\xff\xfe\x00\x00", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]),
            st.builds(lambda b, n: b[:n], good, st.integers(0, 200)),                    # truncated
            st.builds(lambda b, i, junk: b[:i] + junk + b[i:], good, st.integers(0, 100),
                      st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\x00", b"\xed\xa0\x80", b"\\", b'"'])),
            st.builds(lambda b: b"\xef\xbb\xbf" + b, good),
            st.builds(lambda b: b.decode().encode("utf-16"), good),
            st.builds(lambda n: b'{"jsonrpc":"2.0","id":' + b"9" * n + b',"method":"Host.ping"}',
                      st.sampled_from([19, 20, 400, 4300, 4301, 5000, 100_000])),
            st.builds(lambda r: encode({"jsonrpc": "2.0", "id": 1, "method": "Host.ping",
                                        "params": {"x": r}}), self.deep()),
            st.builds(lambda r: r.data, self.deep()),
            st.builds(lambda b, n: b * n, good, st.integers(2, 3)),                       # concatenated
        )

    @_memo
    def http(self) -> st.SearchStrategy[FuzzRequest]:
        good = self.message(True).map(lambda m: encode(m[1]))
        pad = b'{"jsonrpc":"2.0","id":1,"method":"Host.ping","params":{"pad":"'
        # (A path with a query, "/jsonrpc?x=1", still routes to the API.)
        return st.one_of(
            st.builds(lambda b, ct: FuzzRequest("http", b, content_type=ct), good,
                      st.sampled_from([None, "text/plain", "application/x-www-form-urlencoded",
                                       "application/jsonx", "multipart/form-data; boundary=x", ""])),
            st.builds(lambda b, m: FuzzRequest("http", b, http_method=m), good,
                      st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])),
            st.builds(lambda b, p: FuzzRequest("http", b, path=p), good,
                      st.sampled_from(["/", "/jsonrpc/", "/JSONRPC", "/jsonrpc/../events", "/events",
                                       "/" + "a" * 3000, "/%00", "/jsonrpc?x=1"])),
            st.builds(lambda b: FuzzRequest("http", b, chunked=True), good),
            st.builds(lambda n: FuzzRequest("http", pad + b"x" * n + b'"}}'),
                      st.sampled_from([(1 << 20) + 1, 2 << 20])),
        )

    @_memo
    def request(self) -> st.SearchStrategy[FuzzRequest]:
        @st.composite
        def draw_request(draw):
            # (Hypothesis favours the first choices a little: the mix comes out
            # near 44/33/9/6/6/2 per cent.)
            category = _weighted(draw, (35, "valid"), (35, "invalid"), (12, "envelope"), (8, "batch"),
                                 (7, "raw"), (3, "http"))
            if category in ("valid", "invalid"):
                verb, msg = draw(self.message(category == "valid"))
                return FuzzRequest(category, encode(msg), verb=verb)
            if category == "envelope":
                verb, msg = draw(self.envelope())
                return FuzzRequest(category, encode(msg), verb=verb)
            if category == "batch":
                return FuzzRequest(category, encode(draw(self.batch())))
            if category == "raw":
                return FuzzRequest(category, draw(self.raw()))
            return draw(self.http())
        return draw_request()


# --- safety: the last step before a body is sent ------------------------------------

def parse_like_agent(body: bytes) -> tuple[bool, Any]:
    """(ok, message) the way vmhost.api.jsonrpc decodes a body."""
    def reject(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")
    try:
        return True, json.loads(body.decode("utf-8"), parse_constant=reject)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False, None


def make_safe(body: bytes, world: World) -> tuple[bytes, list[str]]:
    """Rewrite the requests in `body` that the agent would execute and that
    could hurt the fixture or the host; returns (body, what was rewritten).
    A body that does not parse, or whose requests all fail the schema, is
    returned as it is (the agent will refuse it before any service runs)."""
    ok, message = parse_like_agent(body)
    if not ok:
        return body, []
    items = message if isinstance(message, list) else [message]
    notes: list[str] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        method, params = item.get("method"), item.get("params", {})
        if not params_valid(method, params):
            continue
        fixed = _safe_params(method, copy.deepcopy(params), world, body)
        if fixed != params:
            notes.append(method)
            item["params"] = fixed
    if not notes:
        return body, []
    return json.dumps(message, separators=(",", ":")).encode("ascii"), notes


def _inside(path: str, root: str) -> bool:
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return False
    root = os.path.realpath(root)
    return real == root or real.startswith(root + os.sep)


def _stand_in(body: bytes, salt: str) -> str:
    """A deterministic UUID no object has, to replace a forbidden target."""
    return str(uuid.UUID(bytes=hashlib.sha256(salt.encode() + body).digest()[:16]))


def _safe_params(method: str, p: dict, world: World, body: bytes) -> dict:
    if method == "StorageDomain.create":
        if not _inside(p["typeArgs"], world.sandbox):
            p["typeArgs"] = world.sandbox
        if len(world.domains) - world.fixture_domains >= world.max_domains:
            # Enough domain monitors already: this one must fail (no such dir).
            p["typeArgs"] = os.path.join(world.sandbox, "no-such-dir")
    elif method == "VM.create":
        vp = p["vmParams"]
        if not vp["vmName"].startswith(world.vm_prefix):
            room = 64 - len(world.vm_prefix)
            vp["vmName"] = world.vm_prefix + vp["vmName"][:room]
            if not params_valid(method, p):
                vp["vmName"] = world.vm_prefix + "renamed"
        if world.vm_start_budget <= 0 and world.protected_vms:
            # Each VM start costs a second or two: beyond the budget the
            # request names an existing VM, and is refused (code 4) after
            # the same checks of its vmParams (any memSize is fine then).
            p["vmID"] = sorted(world.protected_vms)[0]
        elif vp["memSize"] > MAX_MEM_MIB:
            vp["memSize"] = 64
    elif method in ("VM.destroy", "VM.pause") and p["vmID"] in world.protected_vms:
        p["vmID"] = _stand_in(body, "vm")
    elif method == "Volume.delete" and p["volumeID"] in world.protected_volumes:
        p["volumeID"] = _stand_in(body, "volume")
    elif method == "Volume.create":
        if p.get("preallocate", "SPARSE") in ("PREALLOCATED", 1) and int(p["size"]) > MAX_PREALLOCATED:
            p["preallocate"] = "SPARSE"
    return p
