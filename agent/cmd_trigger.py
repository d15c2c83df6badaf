"""``edge-agent trigger``: one prompt, through this device's node daemon if it runs (its warm
connection), else orchestrated here on a connection of this process's own."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from typing import Any, TextIO

from agent.cli import Printer, install_signals, restore_signals, self_snapshot, usable_executor
from agent.config import Config
from agent.errors import ExitCode, UsageError


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


def run(cfg: Config, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from agent import control

    prompt = _read_prompt(args)
    printer = Printer(args, out, err)
    daemon = control.connect(cfg.state_dir)
    if daemon is not None:  # the device's own node runs: it orchestrates, with its warm connection
        return _trigger_via_daemon(daemon, prompt, args, printer)
    return _trigger_here(cfg, prompt, args, printer)


def _prompt_of(args: argparse.Namespace, prompt: str) -> Any:
    """The command line's prompt request, checked as every front checks one."""
    from agent.messages import Prompt
    return Prompt(prompt, args.max_new_tokens, args.need, args.dry_run, args.bid_timeout, args.model)


def _trigger_via_daemon(sock: Any, prompt: str, args: argparse.Namespace, printer: Printer) -> int:
    from agent import control

    caught: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        sock.shutdown(socket.SHUT_WR)  # the daemon sees us leave and cancels the job

    winner: str | None = None
    request = control.PromptRequest(_prompt_of(args, prompt))
    handlers = install_signals(on_signal)
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
        restore_signals(handlers)
    if caught:
        # The daemon cancelled the job on its device when we hung up.
        print(f"\n✗ interrupted; {winner} was told to stop" if winner else "\n✗ interrupted", file=printer.err)
        return ExitCode.TERMINATED if caught[0] == signal.SIGTERM else ExitCode.INTERRUPTED
    return code


def _trigger_here(cfg: Config, prompt: str, args: argparse.Namespace, printer: Printer) -> int:
    """No daemon on this device: this process orchestrates, connecting to the broker itself."""
    from dataclasses import replace

    from agent.fleet import Fleet
    from agent.fronts import orchestrator

    ask = _prompt_of(args, prompt)
    if ask.bid_timeout_s is not None:
        cfg = replace(cfg, auction=replace(cfg.auction, bid_timeout_s=ask.bid_timeout_s))
    npu_exec = usable_executor(cfg, "npu", printer.err) if cfg.npu.enabled else None
    cpu_exec = usable_executor(cfg, "cpu", printer.err) if cfg.cpu.enabled else None
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
                        local_snapshot=self_snapshot(cfg, npu_exec, cpu_exec), on_token=printer.token,
                        on_decision=lambda d: printer.decision(d.winner, d.path, d.score),
                        on_progress=printer.progress)
    # Ctrl-C or SIGTERM: the job in flight is cancelled on its device, then we exit 130/143.
    caught: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if caught:
            raise KeyboardInterrupt  # a second one: leave now
        caught.append(signum)
        orch.interrupt()

    handlers = install_signals(on_signal)
    try:
        result = orch.run(ask.prompt, max_new_tokens=ask.max_new_tokens, need=ask.need, dry_run=ask.dry_run,
                          model=ask.model)
    finally:
        restore_signals(handlers)
        for fleet in fleets:
            fleet.close()
    if caught:
        print(f"\n✗ {result.error or 'interrupted'}", file=printer.err)
        return ExitCode.TERMINATED if caught[0] == signal.SIGTERM else ExitCode.INTERRUPTED
    return printer.outcome(result.to_json())
