"""Command line: ``main(argv) -> exit code``.

    python -m agent --role node --config FILE      the node daemon
    python -m agent trigger --config FILE PROMPT   one orchestration
    python -m agent status --config FILE           the roster
    python -m agent check --config FILE            is this device ready to be a node?

Every ``AgentError`` becomes its documented exit code and a one-line message (see
``agent.errors.ExitCode``); anything else is a bug, reported in one line with a hint to
run with ``-v`` for the traceback, and exit code 70.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, TextIO

from agent import __version__
from agent.config import Config, load_config
from agent.errors import AgentError, ExitCode, UsageError

log = logging.getLogger("agent")

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
            return _node(cfg, err)
        if command == "trigger":
            return _trigger(cfg, args, out, err)
        if command == "check":
            return _check(cfg, out, files)
        if command == "forget":
            return _forget(cfg, args, out, err)
        if command == "serve":
            return _serve(cfg, args, err)
        return _status(cfg, args, out, err)
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


# ---------------------------------------------------------------------------- node


def _node(cfg: Config, err: TextIO) -> int:
    """Run until SIGINT/SIGTERM. The first signal drains (no new work; running jobs get
    ``drain_s`` to finish), a second one stops at once. Another node with our device_id
    ends it with exit 2."""
    from agent.node import Node

    stop = threading.Event()
    fatal: list[AgentError] = []
    signals: list[int] = []

    def on_fatal(error: AgentError) -> None:
        fatal.append(error)
        stop.set()

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)
        if len(signals) == 1:
            log.info("received %s: finishing running jobs (up to %g s); send it again to stop at once",
                     signal.Signals(signum).name, cfg.drain_s)
        else:
            log.warning("received %s again: stopping now", signal.Signals(signum).name)
        stop.set()

    node = Node(cfg, on_fatal=on_fatal)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        node.start()
        # Short waits: a signal may land on another thread, and Python runs its handler
        # only when the main thread wakes up.
        while not stop.wait(0.5):
            pass
        if signals and not fatal:
            stop.clear()
            drained = threading.Thread(target=node.drain, args=(cfg.drain_s,), name="drain", daemon=True)
            drained.start()
            while drained.is_alive() and len(signals) < 2:
                drained.join(0.2)
    finally:
        node.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if fatal:
        print(f"error: {fatal[0]}", file=err)
        return fatal[0].exit_code
    return ExitCode.OK


# ---------------------------------------------------------------------------- trigger


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt from the argument, --prompt-file or stdin; UsageError if it is unusable."""
    try:
        if args.prompt_file:
            with open(args.prompt_file, "rb") as fh:
                prompt = fh.read().decode("utf-8")
        elif args.prompt is None or args.prompt == "-":
            if sys.stdin is None or sys.stdin.isatty():
                raise UsageError("no prompt: pass it as an argument, with --prompt-file, or on stdin")
            prompt = sys.stdin.buffer.read().decode("utf-8")
        else:
            prompt = args.prompt
        prompt.encode("utf-8")  # an argument with undecodable bytes carries lone surrogates
    except OSError as exc:
        raise UsageError(f"cannot read the prompt: {exc.strerror or exc}") from None
    except UnicodeError:
        raise UsageError("the prompt is not valid UTF-8 text") from None
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


class _Printer:
    """What ``trigger`` shows while it waits and once the answer is in."""

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


def _trigger(cfg: Config, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from agent import control

    prompt = _read_prompt(args)
    printer = _Printer(args, out, err)
    daemon = control.connect(cfg.state_dir)
    if daemon is not None:  # the device's own node runs: it orchestrates, with its warm connection
        return _trigger_via_daemon(daemon, prompt, args, printer)
    return _trigger_here(cfg, prompt, args, printer)


def _prompt_of(args: argparse.Namespace, prompt: str) -> Any:
    """The command line's prompt request, checked as every front checks one."""
    from agent.messages import Prompt
    return Prompt(prompt, args.max_new_tokens, args.need, args.dry_run, args.bid_timeout, args.model)


def _trigger_via_daemon(sock: Any, prompt: str, args: argparse.Namespace, printer: _Printer) -> int:
    from agent import control

    caught: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        sock.shutdown(socket.SHUT_WR)  # the daemon sees us leave and cancels the job

    winner: str | None = None
    request = control.PromptRequest(_prompt_of(args, prompt))
    handlers = _install_signals(on_signal)
    try:
        with sock:
            for event in control.request(sock, request):
                if isinstance(event, control.Decision):
                    winner = event.winner
                    printer.decision(winner, event.path, event.score)
                elif isinstance(event, control.Text):
                    printer.token(event.text)
                elif isinstance(event, control.Progress):
                    printer.progress(event.text)
                elif isinstance(event, control.Outcome):
                    code = printer.outcome(event.outcome)
                    break
                elif isinstance(event, control.Failure):
                    print(f"error: {event.error}", file=printer.err)
                    code = event.exit_code
                    break
            else:
                if not caught:
                    print("error: the node daemon went away before answering", file=printer.err)
                code = ExitCode.FAILED
    except ValueError as exc:
        print(f"error: the node daemon sent something unexpected: {exc}", file=printer.err)
        code = ExitCode.FAILED
    except OSError as exc:
        if not caught:
            print(f"error: lost the node daemon: {exc}", file=printer.err)
        code = ExitCode.FAILED
    finally:
        _restore_signals(handlers)
    if caught:
        # The daemon cancelled the job on its device when we hung up.
        print(f"\n✗ interrupted; {winner} was told to stop" if winner else "\n✗ interrupted", file=printer.err)
        return ExitCode.TERMINATED if caught[0] == signal.SIGTERM else ExitCode.INTERRUPTED
    return code


def _trigger_here(cfg: Config, prompt: str, args: argparse.Namespace, printer: _Printer) -> int:
    """No daemon on this device: this process orchestrates, connecting to the broker itself."""
    from dataclasses import replace

    from agent.fleet import Fleet
    from agent.fronts import orchestrator

    ask = _prompt_of(args, prompt)
    if ask.bid_timeout_s is not None:
        cfg = replace(cfg, auction=replace(cfg.auction, bid_timeout_s=ask.bid_timeout_s))
    npu_exec = _usable(cfg, "npu", printer.err) if cfg.npu.enabled else None
    cpu_exec = _usable(cfg, "cpu", printer.err) if cfg.cpu.enabled else None
    fleets: list[Fleet] = []

    shown = [0]

    def identity_wait(waited: float) -> None:
        if int(waited) > shown[0]:
            shown[0] = int(waited)
            printer.progress(f"waiting for another process of this device to let go of its broker connection "
                             f"({waited:.0f} s; run the node daemon here to share one)")

    def connect() -> Fleet:
        fleet = Fleet.open(cfg, wait_identity_s=cfg.auction.job_timeout_s, on_wait=identity_wait)
        fleets.append(fleet)
        return fleet

    orch = orchestrator(cfg, connect=connect, npu_exec=npu_exec, cpu_exec=cpu_exec,
                        local_snapshot=_self_snapshot(cfg, npu_exec, cpu_exec), on_token=printer.token,
                        on_decision=lambda d: printer.decision(d.winner, d.path, d.score),
                        on_progress=printer.progress)
    # Ctrl-C or SIGTERM: the job in flight is cancelled on its device, then we exit 130/143.
    caught: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if caught:
            raise KeyboardInterrupt  # a second one: leave now
        caught.append(signum)
        orch.interrupt()

    handlers = _install_signals(on_signal)
    try:
        result = orch.run(ask.prompt, max_new_tokens=ask.max_new_tokens, need=ask.need, dry_run=ask.dry_run,
                          model=ask.model)
    finally:
        _restore_signals(handlers)
        for fleet in fleets:
            fleet.close()
    if caught:
        print(f"\n✗ {result.error or 'interrupted'}", file=printer.err)
        return ExitCode.TERMINATED if caught[0] == signal.SIGTERM else ExitCode.INTERRUPTED
    return printer.outcome(result.to_json())


def _install_signals(handler: Any) -> dict[int, Any]:
    """Our SIGINT/SIGTERM handler, if we are the main thread (tests call main() from others)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Any]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


def _self_snapshot(cfg: Config, npu_exec: Any, cpu_exec: Any) -> Any:
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


def _usable(cfg: Config, mode: str, err: TextIO) -> Any:
    from agent.executors import usable

    section = cfg.npu if mode == "npu" else cfg.cpu
    executor, problem = usable(section.executor, name=cfg.device_id)
    if problem:
        print(f"warning: {mode} executor unusable here: {problem}", file=err)
    return executor


# ---------------------------------------------------------------------------- status


def _status(cfg: Config, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The roster, once or (--watch) refreshed in place. Through this device's node if it
    runs (no second connection as this device), else over a connection of our own."""
    import time

    from agent import control
    from agent.status import estimates, table

    fleet = None
    if not control.running(cfg.state_dir):
        from agent.fleet import Fleet

        fleet = Fleet.open(cfg, role="status")
        fleet.sync()

    def current() -> list[dict[str, Any]]:
        if fleet is not None:
            from agent.status import rows
            devices = rows(fleet.roster, time.time())
        else:
            daemon = control.connect(cfg.state_dir)
            if daemon is None:
                raise UsageError("the node daemon of this state_dir stopped; run status again")
            with daemon:
                events = list(control.request(daemon, control.StatusRequest()))
            found = next((e.devices for e in events if isinstance(e, control.Status)), None)
            if found is None:
                raise AgentError(f"the node daemon did not answer: {events}")
            devices = found
        return estimates(devices, cfg)

    try:
        if not args.watch:
            devices = current()
            if args.json:
                print(json.dumps({"devices": devices}), file=out)
            elif not devices:
                print(f"no devices have announced themselves on {cfg.broker.host}:{cfg.broker.port}"
                      f" (prefix {cfg.topic_prefix!r})", file=out)
            else:
                print("\n".join(table(devices)), file=out)
            return ExitCode.OK
        in_place = out.isatty() and not args.json
        try:
            while True:
                devices = current()
                if args.json:
                    print(json.dumps({"at": round(time.time(), 3), "devices": devices}), file=out, flush=True)
                else:
                    online = sum(d["online"] for d in devices)
                    head = (f"{time.strftime('%H:%M:%S')}  {online} of {len(devices)} device(s) online on "
                            f"{cfg.broker.host}:{cfg.broker.port}; every {args.interval:g} s, Ctrl-C to stop")
                    body = "\n".join([head, *table(devices)])
                    print(("\x1b[H\x1b[2J" if in_place else "") + body + ("" if in_place else "\n"), file=out,
                          flush=True)
                time.sleep(args.interval)  # the refresh period itself, not a synchronisation
        except KeyboardInterrupt:
            return ExitCode.OK
    finally:
        if fleet is not None:
            fleet.close()


def _forget(cfg: Config, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from agent import control
    from agent.topics import is_id

    device = args.device
    if not is_id(device):
        raise UsageError(f"{device!r} is not a device id")
    final: control.Event
    daemon = control.connect(cfg.state_dir)
    if daemon is not None:
        with daemon:
            events = list(control.request(daemon, control.ForgetRequest(device, bool(args.force))))
        final = events[-1] if events else control.Failure("no answer", ExitCode.FAILED)
    else:
        from agent.fleet import Fleet
        from agent.status import forget

        fleet = Fleet.open(cfg, role="forget")
        try:
            fleet.sync()
            final = forget(fleet, device, force=bool(args.force))
        finally:
            fleet.close()
    if isinstance(final, control.Failure):
        print(f"error: {final.error}", file=err)
        return final.exit_code
    if not isinstance(final, control.Forgot):
        print(f"error: the node daemon answered {final.type!r}", file=err)
        return ExitCode.FAILED
    print(f"forgot {device}: cleared {', '.join(final.cleared)}", file=out)
    return ExitCode.OK


# ---------------------------------------------------------------------------- check


def _check(cfg: Config, out: TextIO, file_problems: Sequence[str] = ()) -> int:
    """One line per thing a node needs; the worst finding decides the exit code. Writes
    nothing: not the state_dir, not a lock, not the broker session of the device."""
    from agent import control
    from agent.errors import BrokerUnavailable
    from agent.executors import build_executor
    from agent.statefiles import writable_problem

    codes: list[int] = []

    def report(what: str, problem: str | None, detail: str, code: int = ExitCode.USAGE) -> None:
        print(f"{'✓' if problem is None else '✗'} {what:<10} {detail if problem is None else problem}", file=out)
        if problem is not None:
            codes.append(code)

    report("config", None, f"{cfg.source}: device_id {cfg.device_id}")
    for problem in file_problems:
        report("files", problem, "")
    state_problem, state_detail = writable_problem(cfg.state_dir)
    report("state_dir", state_problem, f"{cfg.state_dir} ({state_detail})")
    runners = [(mode, section.executor) for mode, section in (("npu", cfg.npu), ("cpu", cfg.cpu)) if section.enabled]
    if not runners:
        report("runners", None, "none: this device only asks (its prompts run on the fleet's devices)")
    for mode, exe_cfg in runners:
        executor = build_executor(exe_cfg, name=f"{cfg.device_id}:{mode}")
        probe = getattr(executor, "probe", executor.check)  # a server is asked, a binary looked up
        report(mode, probe(), f"{exe_cfg.kind} ready")
    broker = ", ".join(f"{h}:{p}" for h, p in cfg.broker.addresses)
    daemon = control.connect(cfg.state_dir)
    if daemon is not None:
        with daemon:
            answered = any(isinstance(e, control.Status) for e in control.request(daemon, control.StatusRequest()))
        report("broker", None if answered else "the node daemon of this state_dir did not answer",
               f"{broker}: a node daemon runs here and owns the connection")
    elif any(p.startswith("broker.") for p in file_problems):
        unreachable = _unreachable(cfg)
        report("broker", f"{broker}: " + ("answers on TCP" if unreachable is None else f"not reachable ({unreachable})")
               + "; not tried with this device's login until the files above are fixed",
               "", ExitCode.USAGE if unreachable is None else ExitCode.BROKER)
    else:
        from agent.fleet import probe_broker

        try:
            protocol = probe_broker(cfg)
            user = f" as {cfg.broker.username}" if cfg.broker.username else ""
            report("broker", None, f"{broker}{' (TLS)' if cfg.broker.tls.enabled else ''}: connected{user} "
                                   f"(MQTT {protocol})")
        except BrokerUnavailable as exc:
            report("broker", str(exc), "", ExitCode.BROKER)
    return ExitCode.USAGE if ExitCode.USAGE in codes else max(codes, default=ExitCode.OK)


def _unreachable(cfg: Config) -> str | None:
    """None if some broker address takes a TCP connection, else why none does."""
    reasons = []
    for host, port in cfg.broker.addresses:
        try:
            socket.create_connection((host, port), timeout=3).close()
            return None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            reasons.append(reason if len(cfg.broker.addresses) == 1 else f"{host}:{port}: {reason}")
    return "; ".join(reasons)


# ---------------------------------------------------------------------------- serve


def _serve(cfg: Config, args: argparse.Namespace, err: TextIO) -> int:
    """Run the HTTP endpoint until SIGINT/SIGTERM (agent/serve.py)."""
    from dataclasses import replace

    from agent import control
    from agent.serve import Backend, DaemonBackend, Gateway, OrchestratorBackend, own_models

    serve_cfg = replace(cfg.serve, host=args.host or cfg.serve.host,
                        port=cfg.serve.port if args.port is None else args.port)
    cfg = replace(cfg, serve=serve_cfg)
    fleets: list[Any] = []
    backend: Backend
    if control.running(cfg.state_dir):
        backend, how = DaemonBackend(cfg), "through this device's node daemon"
    else:
        from agent.fleet import Fleet
        from agent.fronts import orchestrator

        npu_exec = _usable(cfg, "npu", err) if cfg.npu.enabled else None
        cpu_exec = _usable(cfg, "cpu", err) if cfg.cpu.enabled else None
        opening = threading.Lock()

        def fleet() -> Any:
            with opening:  # one connection, opened on first use and kept (it reconnects itself)
                if not fleets:
                    fleets.append(Fleet.open(cfg, role="serve"))
                return fleets[0]

        def make() -> Any:
            return orchestrator(cfg, connect=fleet, npu_exec=npu_exec, cpu_exec=cpu_exec,
                                local_snapshot=_self_snapshot(cfg, npu_exec, cpu_exec))

        own = own_models(npu_exec, cpu_exec)
        backend, how = OrchestratorBackend(make, fleet, own, cfg.device_id), "as this device"
    gateway = Gateway(cfg, backend)
    try:
        host, port = gateway.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on {serve_cfg.host}:{serve_cfg.port}: {exc.strerror or exc}") from None
    print(f"serving the fleet {how} on http://{host}:{port} (OpenAI's API under /v1, Ollama's under /api; "
          "Ctrl-C to stop)", file=err, flush=True)
    stop = threading.Event()
    previous = _install_signals(lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):  # short waits: Python runs signal handlers on the main thread
            pass
    finally:
        _restore_signals(previous)
        gateway.stop()
        for f in fleets:
            f.close()
    return ExitCode.OK
