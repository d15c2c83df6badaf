"""``edge-agent check``: is this device ready to be a node? One line per need; writes nothing."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TextIO

from agent.config import Config
from agent.errors import ExitCode


def run(cfg: Config, out: TextIO, file_problems: Sequence[str] = ()) -> int:
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
