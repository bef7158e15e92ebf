"""vmhost-client: call the vmhost API from a shell.

    vmhost-client [--url URL] [--timeout S] [--no-validate]
                  [--tls-cert F --tls-key F --tls-ca F] Namespace verb [key=value ...]

    vmhost-client Host getVMList
    vmhost-client VM getStats vmID=...
    vmhost-client Volume create storagedomainID=... size=1073741824 volFormat=COW

A value is kept as text when the schema says the parameter is a string;
otherwise it is read as a JSON literal (42, true, null, [..], {..}) and kept
as text if it is not one. Prints the JSON result; exit status 0 on success,
1 on an API or connection error (or a job that did not succeed), 2 on a
usage error.

The URL is http(s)://host:port/jsonrpc, or stomp(s)://host:port for VDSM's
transport (JSON-RPC over STOMP 1.2) on the same port. An https or stomps
URL needs --tls-cert, --tls-key and --tls-ca (or VMHOST_TLS_CERT,
VMHOST_TLS_KEY, VMHOST_TLS_CA): the client certificate the agent asks for,
its key, and the CA that signed the agent's certificate (see `vmhost pki
init`).

Commands that are more than one call:

    vmhost-client VM merge vmID=... drive='{"domainID": ..., "imageID": ..., "volumeID": <leaf>}'
        baseVolUUID=... topVolUUID=... [bandwidth=N] [jobUUID=...] [--wait]

  Without --wait, prints the job UUID. With --wait, follows the job (a
  progress bar on stderr) until it leaves vmJobs and prints its outcome,
  woken by the agent's events about the job (server-sent events over HTTP,
  jms.queue.events over STOMP; the bar is refreshed once a second, and an
  agent without events is polled instead),
  {"jobUUID": ..., "state": "done" | "aborted" | "failed", ...}; exit 0 only
  for done. Ctrl-C stops waiting, not the merge (the message says how to
  abort it).

    vmhost-client snapshot remove vmID=... imageID=... volumeID=V [bandwidth=N]
    vmhost-client snapshot remove storagedomainID=... imageID=... volumeID=V

  Removes volume V from the drive's chain while the VM runs, for people
  without an engine: V's data is merged into its parent (an active merge if
  V is the leaf, an internal merge otherwise), then V is deleted. Prints the
  new chain, base first. The base volume cannot be removed (exit 2): remove
  its child instead, which merges the child into the base. If the merge does
  not succeed, exit 1 and nothing is deleted. Always waits (--wait is
  accepted and implied).
  With storagedomainID and no vmID (or a vmID not running on this host: a VM
  that is down), the image must not be in use: a cold merge (SDM.merge),
  followed in Host.getJobs with the same progress bar.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from vmhost.api.schema import Schema, UnknownVerb, load_schema
from vmhost.api.tls import TlsError
from vmhost.client import DEFAULT_URL, Client, RpcError, TransportError


class UsageError(Exception):
    pass


class CommandFailed(Exception):
    """The command ran and did not succeed: `message` goes to stderr, `result`
    (if any) is still printed on stdout, and the exit status is `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1, result: Any = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.result = result


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
    _check_tls_options(parser, args)
    name = f"{args.namespace}.{args.verb}"
    command = COMMANDS.get(name)
    if command is None:
        if not args.no_validate:
            _check_verb(parser, load_schema(), name)
        command = call_verb
    try:
        with Client(args.url, timeout=args.timeout, validate=not args.no_validate,
                    tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca) as client:
            result = command(client, name, args.args)
    except (UsageError, TlsError) as e:
        parser.error(str(e))
    except CommandFailed as e:
        if e.result is not None:
            print(json.dumps(e.result, indent=2))
        print(e.message, file=sys.stderr)
        return e.exit_code
    except RpcError as e:
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except TransportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
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


TLS_OPTIONS = (("tls-cert", "VMHOST_TLS_CERT", "client certificate, PEM"),
               ("tls-key", "VMHOST_TLS_KEY", "key of the client certificate, PEM"),
               ("tls-ca", "VMHOST_TLS_CA", "CA certificate that signed the agent's, PEM"))


def _check_tls_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill args.tls_* from the environment for an https URL, and refuse what
    cannot work: an https URL without all three, TLS options with a plain
    URL. (The environment is not read for a plain URL: it may well be set
    for another agent.)"""
    scheme = args.url.lower().partition(":")[0]
    if scheme not in ("https", "stomps"):
        given = [f"--{option}" for option, _, _ in TLS_OPTIONS
                 if getattr(args, option.replace("-", "_"))]
        if given:
            what = "plain STOMP" if scheme == "stomp" else "plain HTTP"
            parser.error(f"{given[0]} is for https URLs, and {args.url} is {what}")
        return
    missing = []
    for option, env, _ in TLS_OPTIONS:
        attr = option.replace("-", "_")
        if not getattr(args, attr):
            setattr(args, attr, os.environ.get(env) or None)
        if not getattr(args, attr):
            missing.append(f"--{option}")
    if missing:
        article = "an" if scheme == "https" else "a"
        parser.error(f"{article} {scheme} URL needs --tls-cert, --tls-key and --tls-ca (or VMHOST_TLS_CERT, "
                     f"VMHOST_TLS_KEY, VMHOST_TLS_CA in the environment); missing "
                     f"{', '.join(missing)}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmhost-client",
        description="Call the vmhost JSON-RPC API. Options go before Namespace.",
        epilog="examples: vmhost-client VM getStats vmID=<uuid>; "
               "vmhost-client VM merge vmID=... drive='{...}' baseVolUUID=... topVolUUID=... "
               "--wait; vmhost-client snapshot remove vmID=... imageID=... volumeID=...")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"API endpoint: http(s)://host:port/jsonrpc or stomp(s)://host:port "
                             f"(default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for an answer")
    parser.add_argument("--no-validate", action="store_true",
                        help="send without checking against the local schema")
    for option, env, what in TLS_OPTIONS:
        parser.add_argument(f"--{option}", metavar="FILE",
                            help=f"{what} (https URLs only; default ${env})")
    parser.add_argument("namespace", help="Host, StorageDomain, Volume, VM, ...")
    parser.add_argument("verb", help="e.g. getVMList, create, getStats")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="key=value",
                        help="parameters (and options of special commands)")
    return parser



# --- following a merge job ----------------------------------------------------

POLL_INTERVAL = 0.2   # VM.getStats about 5 times a second, without events
PROGRESS_INTERVAL = 1.0  # with events: VM.getStats once a second for the bar
BAR_WIDTH = 10
RECOVERING = 99       # the agent restarted and is recovering: ask again
_TERMINAL = {"DONE": "done", "ABORTED": "aborted", "FAILED": "failed"}


def _pause(seconds: float) -> None:
    time.sleep(seconds)  # a seam: tests interrupt the wait here


class ProgressBar:
    """One line on a terminal, redrawn in place: `[#####.....]  45%  commit`."""

    def __init__(self, out: TextIO):
        self._out = out
        self._shown = ""

    def draw(self, job: Mapping[str, Any]) -> None:
        line = progress_line(job)
        if line != self._shown:  # no flood of identical lines into a log
            # Padding wipes what a longer previous line left behind.
            self._out.write("\r" + line.ljust(len(self._shown)))
            self._out.flush()
            self._shown = line

    def finish(self) -> None:
        if self._shown:
            self._out.write("\n")
            self._out.flush()
            self._shown = ""


def progress_line(job: Mapping[str, Any]) -> str:
    """cur and end are strings of integers (VDSM's vmJobs); end 0 = not known yet."""
    try:
        cur, end = int(job.get("cur", 0)), int(job.get("end", 0))
    except (TypeError, ValueError):
        cur, end = 0, 0
    percent = min(100, cur * 100 // end) if end > 0 else 0
    done = min(BAR_WIDTH, (percent * BAR_WIDTH + 50) // 100)
    bar = "#" * done + "." * (BAR_WIDTH - done)
    return f"[{bar}] {percent:3d}%  {job.get('state', '')}"


def wait_for_job(client: Client, vm_id: str, job_id: str, *, image: str | None = None,
                 top: str | None = None, interrupt_hint: str = "",
                 progress: TextIO | None = None) -> dict[str, Any]:
    """Follow a merge job until it leaves vmJobs, or shows FAILED there.
    Returns {"jobUUID", "state": done | aborted | failed | unknown, "error"?}.
    Ctrl-C raises CommandFailed (exit 130) saying how to abort the job."""
    bar = ProgressBar(progress or sys.stderr)
    # Subscribed before the first look: no change is missed in between.
    watch = JobWatch.start(client, vm_id, job_id)
    try:
        while True:
            seen, job = _poll_job(client, vm_id, job_id)
            if seen == "gone":
                break
            if job.get("state") == "failed":
                return {"jobUUID": job_id, "state": "failed", "error": job.get("error", "")}
            if seen == "running":
                bar.draw(job)
            if watch is None:
                _pause(POLL_INTERVAL)
            else:
                watch.wait(PROGRESS_INTERVAL)
    except KeyboardInterrupt:
        raise CommandFailed(_stopped_waiting(client, vm_id, job_id, interrupt_hint), 130) from None
    finally:
        bar.finish()
        if watch is not None:
            watch.close()
    return job_outcome(client, vm_id, job_id, image=image, top=top)


class JobWatch:
    """Wakes the waiting thread when the agent publishes an event about a
    job or its VM. A reader thread follows the event stream (SSE or STOMP:
    the same event dicts); the waiting thread stays interruptible."""

    def __init__(self, stream: Any, vm_id: str, job_id: str):
        self._stream = stream
        self._vm_id, self._job_id = vm_id, job_id
        self._changed = threading.Event()
        self.events = 0  # events about the job seen (for tests)
        threading.Thread(target=self._read, name="job-watch", daemon=True).start()

    @classmethod
    def start(cls, client: Client, vm_id: str, job_id: str) -> JobWatch | None:
        """None if the agent has no event stream (then the caller polls)."""
        try:
            stream = client.events(timeout=None)
        except (RpcError, TransportError):
            return None
        return cls(stream, vm_id, job_id)

    def wait(self, seconds: float) -> None:
        """Until an event about the job came, or `seconds` passed."""
        if self._changed.wait(seconds):
            self._changed.clear()

    def close(self) -> None:
        self._stream.close()

    def _read(self) -> None:
        try:
            for event in self._stream:
                if event.get("jobId") == self._job_id or (
                        event.get("event") == "vm" and event.get("vmId") == self._vm_id):
                    self.events += 1
                    self._changed.set()
        except (TransportError, OSError, ValueError, AttributeError):
            # Closed by close() (http.client raises AttributeError when its file is
            # closed under a reading thread), or the agent went away: polling goes on.
            pass
        # The stream ended: wake the waiter, whose next look finds out why.
        self._changed.set()


def _poll_job(client: Client, vm_id: str, job_id: str) -> tuple[str, dict[str, Any]]:
    """("running", the job's vmJobs entry), ("gone", {}) once it left vmJobs,
    or ("unknown", {}) while nothing can be said (the agent is recovering)."""
    try:
        stats = client.call("VM.getStats", vmID=vm_id)[0]
    except RpcError as e:
        if e.code == RECOVERING:
            return "unknown", {}
        raise
    jobs = stats.get("vmJobs")
    if jobs is None:  # reported only once the agent checked the jobs against libvirt
        return "unknown", {}
    job = jobs.get(job_id)
    return ("running", job) if job is not None else ("gone", {})


def job_outcome(client: Client, vm_id: str, job_id: str, *, image: str | None = None,
                top: str | None = None) -> dict[str, Any]:
    """How a job that left vmJobs ended: from the job history, or (the
    history is in memory and lost when the agent restarts) from the chain:
    the merge succeeded iff top left the drive's chain."""
    for entry in reversed(client.call("Host.getJobHistory")):
        if entry.get("id") == job_id:
            outcome = {"jobUUID": job_id, "state": _TERMINAL.get(entry.get("state"), "unknown")}
            if entry.get("error"):
                outcome["error"] = entry["error"]
            return outcome
    if image and top:
        chain = volume_ids(find_drive(client, vm_id, image))
        if top not in chain:
            return {"jobUUID": job_id, "state": "done"}
    return {"jobUUID": job_id, "state": "unknown",
            "error": "the job is neither running nor in the job history"}


def _stopped_waiting(client: Client, vm_id: str, job_id: str, hint: str) -> str:
    lines = [f"stopped waiting; merge job {job_id} goes on in the agent.",
             f"To abort it: vmhost-client{_url_option(client)} VM abortMerge vmID={vm_id} jobUUID={job_id}"]
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def check_outcome(outcome: dict[str, Any], detail: str = "") -> dict[str, Any]:
    """The outcome if done; otherwise CommandFailed with it (exit 1)."""
    if outcome["state"] == "done":
        return outcome
    job_id = outcome["jobUUID"]
    if outcome["state"] == "aborted":
        message = f"merge job {job_id} was aborted; the chain is unchanged"
    elif outcome["state"] == "failed":
        message = f"merge job {job_id} failed: {outcome.get('error', '')}"
    else:
        message = f"merge job {job_id}: outcome unknown: {outcome.get('error', '')}"
    if detail:
        message += f"\n{detail}"
    raise CommandFailed(message, 1, outcome)


def _split_flags(args: list[str], allowed: set[str]) -> tuple[set[str], list[str]]:
    flags = {a for a in args if a.startswith("--")}
    unknown = sorted(flags - allowed)
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} (options here: {', '.join(sorted(allowed))})")
    return flags, [a for a in args if not a.startswith("--")]


# --- VM merge [--wait] ------------------------------------------------------------

def merge_command(client: Client, verb: str, args: list[str]) -> Any:
    flags, words = _split_flags(args, {"--wait"})
    params = parse_params(load_schema(), verb, words)
    job_id = client.call(verb, **params)
    if "--wait" not in flags:
        return job_id
    drive = params.get("drive")
    image = drive.get("imageID") if isinstance(drive, dict) else None
    outcome = wait_for_job(client, params["vmID"], job_id, image=image,
                           top=params.get("topVolUUID"))
    return check_outcome(outcome, _dismiss_hint(outcome, params["vmID"]))


def _dismiss_hint(outcome: dict[str, Any], vm_id: str) -> str:
    if outcome["state"] != "failed":
        return ""
    return ("The failed job stays in vmJobs until dismissed: vmhost-client VM dismissJob "
            f"vmID={vm_id} jobUUID={outcome['jobUUID']}")


# --- snapshot remove ---------------------------------------------------------------

def find_drive(client: Client, vm_id: str, image: str) -> dict[str, Any]:
    vms = client.call("Host.getVMFullList", vmList=[vm_id])
    if not vms:
        raise CommandFailed(f"error: no VM {vm_id} on this host")
    for device in vms[0].get("devices", []):
        if device.get("imageID") == image and "volumeChain" in device:
            return device
    raise CommandFailed(f"error: VM {vm_id} has no drive with image {image}")


def volume_ids(drive: Mapping[str, Any]) -> list[str]:
    return [v["volumeID"] for v in drive["volumeChain"]]


def removal_plan(chain: list[str], volume: str) -> tuple[str, str]:
    """(base, top) of the merge that removes `volume` from `chain` (base
    first): its data goes into its parent. The base has no parent to go to."""
    if volume not in chain:
        raise CommandFailed(f"error: volume {volume} is not in the chain {chain}")
    index = chain.index(volume)
    if index == 0:
        child = f"; remove its child {chain[1]} instead" if len(chain) > 1 else \
            " (it is the only volume)"
        raise UsageError(f"volume {volume} is the base of the chain and cannot be removed{child}")
    return chain[index - 1], volume


def _key_values(words: list[str], required: tuple[str, ...],
                optional: tuple[str, ...] = ()) -> dict[str, str]:
    values: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {word!r}")
        if key not in required and key not in optional:
            raise UsageError(f"unknown parameter {key!r} (expected {', '.join(required + optional)})")
        if key in values:
            raise UsageError(f"parameter {key!r} given twice")
        values[key] = value
    missing = [k for k in required if k not in values]
    if missing:
        raise UsageError(f"missing {', '.join(k + '=...' for k in missing)}")
    return values


def snapshot_remove(client: Client, verb: str, args: list[str]) -> list[str]:
    _, words = _split_flags(args, {"--wait"})  # waiting is implied
    opts = _key_values(words, ("imageID", "volumeID"), ("vmID", "storagedomainID", "bandwidth"))
    vm_id = opts.get("vmID")
    sd = opts.get("storagedomainID")
    if vm_id is None and sd is None:
        raise UsageError("give vmID=... (a VM running on this host) or storagedomainID=... "
                         "(an image no VM runs: a cold merge)")
    if vm_id is not None and (sd is None or client.call("Host.getVMFullList", vmList=[vm_id])):
        return _live_snapshot_remove(client, vm_id, opts)
    if "bandwidth" in opts:
        raise UsageError("bandwidth applies to a live merge only")
    return cold_snapshot_remove(client, sd, opts["imageID"], opts["volumeID"])


def _live_snapshot_remove(client: Client, vm_id: str, opts: dict[str, str]) -> list[str]:
    image, volume = opts["imageID"], opts["volumeID"]
    extra: dict[str, Any] = {}
    if "bandwidth" in opts:
        if not opts["bandwidth"].isdigit():
            raise UsageError(f"bandwidth must be a non-negative integer, got {opts['bandwidth']!r}")
        extra["bandwidth"] = int(opts["bandwidth"])
    drive = find_drive(client, vm_id, image)
    chain = volume_ids(drive)
    base, top = removal_plan(chain, volume)
    # Our own job id: the abort hint can name it even if the answer is lost.
    job_id = str(uuid.uuid4())
    client.call("VM.merge", vmID=vm_id, jobUUID=job_id, baseVolUUID=base, topVolUUID=top,
                drive={"domainID": drive["domainID"], "imageID": image, "volumeID": chain[-1]},
                **extra)
    delete = (f"Once it is done, delete the volume: vmhost-client{_url_option(client)} Volume delete "
              f"storagedomainID={drive['domainID']} imageID={image} volumeID={volume}")
    outcome = wait_for_job(client, vm_id, job_id, image=image, top=top, interrupt_hint=delete)
    check_outcome(outcome, "\n".join(filter(None, [f"volume {volume} was not deleted",
                                                    _dismiss_hint(outcome, vm_id)])))
    new_chain = volume_ids(find_drive(client, vm_id, image))
    if volume in new_chain:  # never delete a volume the VM still reads
        raise CommandFailed(f"error: merge job {job_id} is done but {volume} is still in the "
                            f"chain {new_chain}; it was not deleted", 1, new_chain)
    client.call("Volume.delete", storagedomainID=drive["domainID"], imageID=image,
                volumeID=volume)
    return new_chain


# --- snapshot remove of an image no VM runs (a cold merge) ---------------------------

BLANK_UUID = "00000000-0000-0000-0000-000000000000"


def cold_snapshot_remove(client: Client, sd: str, image: str, volume: str) -> list[str]:
    """SDM.merge of `volume` into its parent, followed in Host.getJobs with
    the progress bar, then Volume.delete of `volume`. Returns the new chain."""
    def info(vol: str) -> dict[str, Any]:
        return client.call("Volume.getInfo", storagedomainID=sd, imageID=image, volumeID=vol)
    base = info(volume)["parent"]
    if base == BLANK_UUID:
        raise UsageError(f"volume {volume} is the base of the chain and cannot be removed; "
                         "remove its child instead")
    generation = info(base)["generation"]
    job_id = str(uuid.uuid4())
    client.call("SDM.merge", job_id=job_id, subchain_info={
        "sd_id": sd, "img_id": image, "base_id": base, "top_id": volume,
        "base_generation": generation})
    job = wait_for_host_job(client, job_id, hint=(
        f"cold merge job {job_id} goes on in the agent.\nTo abort it: vmhost-client"
        f"{_url_option(client)} Host abortJob job_id={job_id}\nOnce it is done, delete the "
        f"volume: vmhost-client{_url_option(client)} Volume delete storagedomainID={sd} "
        f"imageID={image} volumeID={volume}"))
    if job["status"] == "gone":
        # The agent restarted and forgot the job: the base's GEN tells the outcome.
        done = info(base)["generation"] == generation + 1
        job = {"id": job_id, "status": "done" if done else "unknown",
               "error": "" if done else "the job is no longer known to the agent"}
    if job["status"] != "done":
        error = job.get("error") or {}
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        raise CommandFailed(f"cold merge job {job_id} {job['status']}: {message}\n"
                            f"volume {volume} was not deleted", 1, job)
    client.call("Volume.delete", storagedomainID=sd, imageID=image, volumeID=volume)
    return storage_chain(client, sd, image, base)


def wait_for_host_job(client: Client, job_id: str, hint: str = "",
                      progress: TextIO | None = None) -> dict[str, Any]:
    """Follow Host.getJobs until the job is done, failed or aborted (its
    HostJobInfo), or is not listed any more ({"status": "gone"})."""
    bar = ProgressBar(progress or sys.stderr)
    try:
        while True:
            try:
                job = client.call("Host.getJobs", job_ids=[job_id]).get(job_id)
            except RpcError as e:
                if e.code != RECOVERING:
                    raise
                job = {"status": "pending", "progress": 0}
            if job is None:
                return {"id": job_id, "status": "gone"}
            if job["status"] in ("done", "failed", "aborted"):
                return job
            bar.draw({"cur": job.get("progress", 0), "end": 100, "state": job["status"]})
            _pause(POLL_INTERVAL)
    except KeyboardInterrupt:
        raise CommandFailed(f"stopped waiting; {hint}", 130) from None
    finally:
        bar.finish()


def storage_chain(client: Client, sd: str, image: str, member: str) -> list[str]:
    """The chain through `member` as the volume metadata tells it, base first:
    parents down to the base, then the LEGAL child up to the leaf."""
    infos = {v: client.call("Volume.getInfo", storagedomainID=sd, imageID=image, volumeID=v)
             for v in client.call("StorageDomain.getVolumes", storagedomainID=sd, imageID=image)}
    chain = [member]
    while infos[chain[0]]["parent"] != BLANK_UUID:
        chain.insert(0, infos[chain[0]]["parent"])
    while kids := [v for v, i in infos.items()
                   if i["parent"] == chain[-1] and i["legality"] == "LEGAL"]:
        chain.append(kids[0])
    return chain


def _url_option(client: Client) -> str:
    option = "" if client.url == DEFAULT_URL else f" --url {client.url}"
    for name, value in (("--tls-cert", client.tls_cert), ("--tls-key", client.tls_key),
                        ("--tls-ca", client.tls_ca)):
        if value:
            option += f" {name} {shlex.quote(value)}"
    return option


COMMANDS["VM.merge"] = merge_command
COMMANDS["snapshot.remove"] = snapshot_remove


if __name__ == "__main__":
    sys.exit(main())
