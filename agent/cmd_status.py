"""``edge-agent status``: the roster, once or refreshed (``--watch``)."""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from agent.config import Config
from agent.errors import AgentError, ExitCode, UsageError


def run(cfg: Config, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The roster, once or (--watch) refreshed in place. Through this device's node if it
    runs (no second connection as this device), else over a connection of our own."""
    import time

    from agent import control
    from agent.armstore import learnt
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
        return estimates(devices, learnt(cfg), cfg.auction.linucb.lambda_)

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
