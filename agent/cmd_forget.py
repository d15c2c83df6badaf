"""``edge-agent forget DEVICE``: remove a retired device's retained topics (through the node daemon if it runs)."""

from __future__ import annotations

import argparse
from typing import TextIO

from agent.config import Config
from agent.errors import ExitCode, UsageError


def run(cfg: Config, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
        from agent.fleet import Fleet, forget

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
