"""vmhost-client: call the vmhost API from a shell.

    vmhost-client [--url URL] [--timeout S] [--no-validate] Namespace verb [key=value ...]

    vmhost-client Host getVMList
    vmhost-client VM getStats vmID=...
    vmhost-client Volume create storagedomainID=... size=1073741824 volFormat=COW

A value is kept as text when the schema says the parameter is a string;
otherwise it is read as a JSON literal (42, true, null, [..], {..}) and kept
as text if it is not one. Prints the JSON result; exit status 0 on success,
1 on an API or connection error, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from vmhost.api.schema import Schema, UnknownVerb, load_schema
from vmhost.client import DEFAULT_URL, Client, RpcError, TransportError


class UsageError(Exception):
    pass


# A command turns the words after "Namespace verb" into a result.
Command = Callable[[Client, str, list[str]], Any]


def call_verb(client: Client, verb: str, args: list[str]) -> Any:
    """The default command: one call of `verb` with key=value parameters."""
    return client.call(verb, **parse_params(load_schema(), verb, args))


# Commands that are more than one plain call (e.g. "VM.merge" with --wait,
# "snapshot.remove") register here under "<first word>.<second word>";
# any other pair of words is a plain verb call.
COMMANDS: dict[str, Command] = {}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    name = f"{args.namespace}.{args.verb}"
    command = COMMANDS.get(name)
    if command is None:
        if not args.no_validate:
            _check_verb(parser, load_schema(), name)
        command = call_verb
    try:
        with Client(args.url, timeout=args.timeout, validate=not args.no_validate) as client:
            result = command(client, name, args.args)
    except UsageError as e:
        parser.error(str(e))
    except RpcError as e:
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except TransportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def parse_params(schema: Schema, verb: str, args: list[str]) -> dict[str, Any]:
    """key=value words -> parameters, typed by the verb's schema."""
    params: dict[str, Any] = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {arg!r}")
        if key in params:
            raise UsageError(f"parameter {key!r} given twice")
        try:
            param = schema.param_schema(verb, key)
        except UnknownVerb:  # --no-validate with a verb this client does not know
            param = None
        params[key] = text if param is not None and _is_string(param) else _literal(text)
    return params


def _is_string(param: Mapping[str, Any]) -> bool:
    enum = param.get("enum")
    return (param.get("type") == "string"
            or (enum is not None and all(isinstance(v, str) for v in enum))
            or isinstance(param.get("const"), str))


def _literal(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError:
        return text


def _not_json(name: str) -> Any:
    raise ValueError(name)  # NaN/Infinity: keep the text


def _check_verb(parser: argparse.ArgumentParser, schema: Schema, name: str) -> None:
    if schema.has(name):
        return
    namespace = name.partition(".")[0]
    siblings = [v.partition(".")[2] for v in schema.verbs() if v.startswith(namespace + ".")]
    hint = f"{namespace} verbs: {', '.join(siblings)}" if siblings else \
        "namespaces: " + ", ".join(sorted({v.partition('.')[0] for v in schema.verbs()}))
    parser.error(f"unknown verb {name!r} ({hint})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmhost-client",
        description="Call the vmhost JSON-RPC API. Options go before Namespace.",
        epilog="example: vmhost-client VM getStats vmID=<uuid>")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"API endpoint (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for an answer")
    parser.add_argument("--no-validate", action="store_true",
                        help="send without checking against the local schema")
    parser.add_argument("namespace", help="Host, StorageDomain, Volume, VM, ...")
    parser.add_argument("verb", help="e.g. getVMList, create, getStats")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="key=value",
                        help="parameters (and options of special commands)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
