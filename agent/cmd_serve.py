"""``edge-agent serve``: the fleet behind OpenAI's and Ollama's HTTP APIs (agent/serve.py), until
SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import threading
from typing import Any, TextIO

from agent.cli import install_signals, restore_signals, self_snapshot, usable_executor
from agent.config import Config
from agent.errors import ExitCode, UsageError


def run(cfg: Config, args: argparse.Namespace, err: TextIO) -> int:
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

        npu_exec = usable_executor(cfg, "npu", err) if cfg.npu.enabled else None
        cpu_exec = usable_executor(cfg, "cpu", err) if cfg.cpu.enabled else None
        opening = threading.Lock()

        def fleet() -> Any:
            with opening:  # one connection, opened on first use and kept (it reconnects itself)
                if not fleets:
                    fleets.append(Fleet.open(cfg, role="serve"))
                return fleets[0]

        def make() -> Any:
            return orchestrator(cfg, connect=fleet, npu_exec=npu_exec, cpu_exec=cpu_exec,
                                local_snapshot=self_snapshot(cfg, npu_exec, cpu_exec))

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
    previous = install_signals(lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):  # short waits: Python runs signal handlers on the main thread
            pass
    finally:
        restore_signals(previous)
        gateway.stop()
        for f in fleets:
            f.close()
    return ExitCode.OK
