"""Command line: ``main(argv) -> exit code``.

    python -m agent --role node --config FILE      the node daemon
    python -m agent trigger --config FILE PROMPT   one orchestration
    python -m agent status --config FILE           the roster
    python -m agent check --config FILE            is this device ready to be a node?

This module is the parser, ``main`` and what the commands share (trigger's progress and
summary lines, signal handling, this device as a candidate); each command's body is a
module of its own: agent/cmd_node.py, cmd_trigger.py, cmd_status.py, cmd_serve.py,
cmd_forget.py, cmd_check.py, each with a ``run``, imported only when its command runs.

Every ``AgentError`` becomes its documented exit code and a one-line message (see
``agent.errors.ExitCode``); anything else is a bug, reported in one line with a hint to
run with ``-v`` for the traceback, and exit code 70.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, TextIO

from agent import __version__
from agent.config import Config, load_config
from agent.errors import AgentError, ExitCode, UsageError

PATH_LABELS = {"local-npu": "NPU - Local", "peer-npu": "NPU - Peer", "peer-cpu": "CPU - Peer",
               "local-cpu": "CPU - Local"}
EXIT_CODES_HELP = ("Exit codes: 0 answered, 1 execution failed, 2 usage or config error, 3 no device can "
                   "run it, 4 timed out, 5 broker not reachable (status), 70 internal error, "
                   "130/143 interrupted (SIGINT/SIGTERM).")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    d: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("-c", "--config", metavar="FILE", default=d,
                        help="YAML config (see configs/); default: built-in defaults")
    parser.add_argument("--broker", metavar="HOST:PORT", default=d,
                        help="override broker.host/port (also AGENT_BROKER_HOST/PORT)")
    parser.add_argument("--device-id", metavar="ID", default=d,
                        help="override device_id (also AGENT_DEVICE_ID)")
    parser.add_argument("-v", "--verbose", action="count", default=d if suppress else 0,
                        help="more logging (-vv for debug, -vvv with the MQTT library's own lines)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=d,
                        help="the node's log level (default: log.level in the config, info)")
    parser.add_argument("--log-json", action="store_true", default=d if suppress else False,
                        help="log one JSON object per line (also log.json in the config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent",
        description="Run LLM prompts across a fleet of edge devices: this device's NPU if it is "
                    "free, else an MQTT auction among peers (free NPU first, then a LinUCB "
                    "latency model).",
        epilog=EXIT_CODES_HELP)
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--role", choices=["node"],
                        help="run as the node daemon (same as the 'node' command)")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    node = sub.add_parser("node", help="run the node daemon (presence, metrics, bids, execution)",
                          description="Run the node daemon. SIGTERM (or Ctrl-C) drains: no new work, "
                                      "running jobs get drain_s to finish; a second signal stops at once.",
                          epilog="Exit codes: 0 stopped cleanly, 2 config error, unusable state_dir, or "
                                 "another node already connected with this device_id.")
    _common(node, suppress=True)

    trig = sub.add_parser("trigger", help="run one prompt on the best device and print the answer",
                          description="Run one prompt: this device's NPU if free, else auction it "
                                      "to the fleet. Streams the answer to stdout.", epilog=EXIT_CODES_HELP)
    _common(trig, suppress=True)
    trig.add_argument("prompt", nargs="?", metavar="PROMPT",
                      help="the prompt; '-' or omitted reads it from stdin")
    trig.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE")
    trig.add_argument("--json", action="store_true",
                      help="print one JSON object (rid, winner, path, text, bids, roster, "
                           "auction_ms, total_ms, timings, attempts) instead of streaming")
    trig.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N",
                      help="most tokens to generate (default 256)")
    trig.add_argument("--need", choices=["any", "npu"], default="any",
                      help="'npu' runs only on an NPU, never on a CPU (default any)")
    trig.add_argument("--model", metavar="NAME",
                      help="run only where this model (or alias) is served (default: any device's own)")
    trig.add_argument("--bid-timeout", type=_positive_float, metavar="S",
                      help="override auction.bid_timeout_s for this run")
    trig.add_argument("--dry-run", action="store_true",
                      help="hold the auction and show who would win, and the ranking; run nothing")
    trig.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    status = sub.add_parser("status", help="show every device the broker knows: online, NPU, load",
                            description="Show the roster from the retained availability and metrics topics.",
                            epilog="Exit codes: 0 shown, 2 usage or config error, 5 broker not reachable, "
                                   "130 interrupted (except --watch, which ends with Ctrl-C and exits 0).")
    _common(status, suppress=True)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("-w", "--watch", action="store_true",
                        help="refresh in place until Ctrl-C (offline devices stay listed, marked)")
    status.add_argument("--interval", type=_positive_float, default=2.0, metavar="S",
                        help="with --watch: seconds between refreshes (default 2)")

    serve = sub.add_parser("serve", help="the fleet behind OpenAI's (/v1) and Ollama's (/api) HTTP APIs",
                           description="Serve OpenAI's API (POST /v1/chat/completions, POST /v1/completions, "
                                       "streamed or not, GET /v1/models, GET /health) and Ollama's on the same "
                                       "address (/, /api/tags, /api/ps, /api/show, /api/chat, /api/generate, "
                                       "/api/pull, /api/version). Each request is one orchestration from "
                                       "this device, as with trigger. With this device's node running, its node "
                                       "does the work (or set serve.enabled in the node's config: one daemon "
                                       "for both).",
                           epilog="HTTP errors: 400 bad request, 401 API key, 404 unknown model, 413 prompt too "
                                  "large, 502 execution failed, 503 no device or the waiting line full (with "
                                  "Retry-After), 504 timed out. Exit codes: 0 stopped, 2 config error or port taken.")
    _common(serve, suppress=True)
    serve.add_argument("--host", metavar="ADDR", help="listen address (serve.host, default 127.0.0.1)")
    serve.add_argument("--port", type=int, metavar="PORT", help="listen port (serve.port, default 8080; 0: any)")

    forget = sub.add_parser("forget", help="remove a retired device: its retained presence, metrics, answer "
                                           "and Home Assistant discovery",
                            description="Clear what the broker keeps for a device that is gone for good, so "
                                        "status and Home Assistant stop listing it. An online device is "
                                        "refused (it would announce itself again) unless --force.",
                            epilog="Exit codes: 0 forgotten, 1 the broker kept something (its ACL: use an "
                                   "operator's config), 2 usage error, an online device without --force, or a "
                                   "device the broker does not know, 5 broker not reachable.")
    _common(forget, suppress=True)
    forget.add_argument("device", metavar="DEVICE", help="the device_id to forget")
    forget.add_argument("--force", action="store_true", help="forget it even if it is online now")

    check = sub.add_parser("check", help="check this device's config, state_dir, model runners and broker",
                           description="Check everything a node needs, report every problem at once, and "
                                       "change nothing. With a node daemon running, the broker is its "
                                       "business: the check asks the daemon instead of connecting.",
                           epilog="Exit codes: 0 ready, 2 something to fix (listed), 5 broker not reachable.")
    _common(check, suppress=True)
    return parser


COMMANDS = ("node", "trigger", "status", "serve", "forget", "check")


def _role_node_help(argv: list[str]) -> list[str]:
    """``--role node --help`` is help for the daemon (``node --help``), not the overview."""
    role_node = any(a == "--role=node" or (a == "--role" and argv[i + 1:i + 2] == ["node"])
                    for i, a in enumerate(argv))
    if role_node and ("-h" in argv or "--help" in argv) and not set(argv) & set(COMMANDS[1:]):
        return ["node", "--help"]
    return argv


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser()
    argv = _role_node_help(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    command = args.command or ("node" if args.role == "node" else None)
    if command is None:
        parser.print_help(err)
        return ExitCode.USAGE
    verbosity = args.verbose or 0
    _setup_logging(None, args, verbosity, command)
    try:
        files: list[str] = []  # check reports unusable credential/TLS files with the rest
        cfg = _load(args, files if command == "check" else None)
        _setup_logging(cfg, args, verbosity, command)
        if command == "node":
            from agent import cmd_node
            return cmd_node.run(cfg, err)
        if command == "trigger":
            from agent import cmd_trigger
            return cmd_trigger.run(cfg, args, out, err)
        if command == "check":
            from agent import cmd_check
            return cmd_check.run(cfg, out, files)
        if command == "forget":
            from agent import cmd_forget
            return cmd_forget.run(cfg, args, out, err)
        if command == "serve":
            from agent import cmd_serve
            return cmd_serve.run(cfg, args, err)
        from agent import cmd_status
        return cmd_status.run(cfg, args, out, err)
    except AgentError as exc:
        print(f"error: {exc}", file=err)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=err)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `status | head`: whoever read our output has had enough
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError):
            pass
        return ExitCode.OK
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] != "agent":
            # A Python without our dependencies: a set-up problem, not a bug.
            print(f"error: this Python ({sys.executable}) lacks the module {exc.name.split('.')[0]!r} that edge-agent "
                  "needs. Use the Python it was installed into (in a clone: .venv/bin/python -m agent …, "
                  "or 'source .venv/bin/activate' first; bash scripts/setup.sh creates .venv), or install "
                  "it into this one", file=err)
            return ExitCode.USAGE
        print(f"internal error: {type(exc).__name__}: {exc}", file=err)
        if verbosity:
            traceback.print_exc(file=err)
        else:
            print("run again with -v to see the traceback, and please report it", file=err)
        return ExitCode.INTERNAL


def _load(args: argparse.Namespace, file_problems: list[str] | None = None) -> Config:
    flags: dict[str, Any] = {"device_id": args.device_id}
    if args.broker:
        host, sep, port = args.broker.rpartition(":")
        if not sep or not host:
            raise UsageError(f"--broker: expected HOST:PORT, got {args.broker!r}")
        flags.update(host=host, port=port)
    return load_config(args.config, flags=flags, file_problems=file_problems)


def _setup_logging(cfg: Config | None, args: argparse.Namespace, verbosity: int, command: str) -> None:
    """The node logs at its configured level (``log.level``, or ``--log-level``); a command
    says only warnings unless -v. -vv is debug everywhere, -vvv adds paho's own lines."""
    from agent import logs

    level = (getattr(args, "log_level", None) or (cfg.log.level if cfg else "info")) if command == "node" else "warning"
    if verbosity:
        level = "debug" if verbosity >= 2 else ("info" if level in ("warning", "error") else level)
    json_lines = bool(getattr(args, "log_json", False) or (cfg is not None and cfg.log.json))
    logs.setup(level, json_lines=json_lines, paho_debug=verbosity >= 3)


# ---------------------------------------------------------------------------- shared by the commands


class Printer:
    """What ``trigger`` shows while it waits and once the answer is in (agent/cmd_trigger.py)."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO):
        self.args, self.out, self.err = args, out, err
        self.streaming = not args.json

    def decision(self, winner: str, path: str, score: float | None) -> None:
        if self.streaming:
            label = PATH_LABELS.get(path, path)
            if path in ("peer-cpu", "local-cpu") and score is not None:
                label += f", LinUCB score {score:.3f}"
            print(f"✓ Winner: {winner} ({label})", file=self.out, flush=True)

    def token(self, text: str) -> None:
        if self.streaming:
            self.out.write(text)
            self.out.flush()

    def progress(self, message: str) -> None:
        if not self.args.quiet:
            print(f"… {message}", file=self.err, flush=True)

    def outcome(self, result: dict[str, Any]) -> int:
        """The end: the JSON, or the summary lines; returns the exit code."""
        if self.streaming and not self.args.dry_run and result["text"] and not result["text"].endswith("\n"):
            print(file=self.out, flush=True)  # end the answer's line before anything on stderr
        for warning in result["warnings"]:
            print(f"warning: {warning}", file=self.err, flush=True)
        if self.args.json:
            print(json.dumps(result, ensure_ascii=False), file=self.out)
        elif self.args.dry_run:
            if result["winner"]:
                label = PATH_LABELS.get(result["path"] or "", result["path"])
                print(f"✓ Winner would be: {result['winner']} ({label})", file=self.out)
            for i, c in enumerate(result["ranking"], 1):
                score = "" if c["score"] is None else f"  LinUCB score {c['score']:.3f}"
                print(f"  {i}. {c['device']:<20} {c['mode']}{score}", file=self.out)
            more = result.get("ranking_total", len(result["ranking"])) - len(result["ranking"])
            if more > 0:
                print(f"  … and {more} more", file=self.out)
        else:
            if result["ok"]:
                bids = result.get("bids_total", len(result["bids"]))  # an older daemon's outcome has no total
                auction = (f"; auction {result['auction_ms']:.1f} ms, {bids} bid(s) from "
                           f"{len(result['roster'])} device(s) online" if result["path"] != "local-npu" else "")
                print(f"answered by {result['winner']} ({result['path']}) in {result['total_ms']:.0f} ms{auction}",
                      file=self.err)
        if not result["ok"]:
            print(f"✗ {result['error']}", file=self.err)
        return int(result["exit_code"])


def install_signals(handler: Any) -> dict[int, Any]:
    """Our SIGINT/SIGTERM handler, if we are the main thread (tests call main() from others)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict[int, Any]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


def self_snapshot(cfg: Config, npu_exec: Any, cpu_exec: Any) -> Any:
    """This device as a candidate when no daemon of its own bids (called once per run)."""
    from agent.locks import CpuSlots
    from agent.metrics import HostSampler, snapshot
    from agent.servicemodel import UNKNOWN_JOB_S

    def local_snapshot() -> Any:
        slots = cfg.cpu.slots if cpu_exec else 0
        busy = CpuSlots(cfg.state_dir, slots).busy()  # jobs other processes run here now
        models = {mode: info for mode, e in (("npu", npu_exec), ("cpu", cpu_exec))
                  if e is not None and (info := e.model_info()) is not None}
        return snapshot(HostSampler().sample(), has_npu=npu_exec is not None, npu_free=False, cpu_slots=slots,
                        queue_depth=busy, recent={}, backlog_s=0.0 if busy < slots else UNKNOWN_JOB_S,
                        models=models)
    return local_snapshot


def usable_executor(cfg: Config, mode: str, err: TextIO) -> Any:
    from agent.executors import usable

    section = cfg.npu if mode == "npu" else cfg.cpu
    executor, problem = usable(section.executor, name=cfg.device_id)
    if problem:
        print(f"warning: {mode} executor unusable here: {problem}", file=err)
    return executor
