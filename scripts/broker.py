"""A private Mosquitto for trying edge-agent by hand (scripts/broker runs this).

It starts ``mosquitto`` from ``mosquitto/dev.conf`` on loopback, on port 18830 unless told
otherwise, with its persistence file in a directory of its own (kept between runs, so
sessions and queued messages survive a restart as in production), and says how to point
the agent at it. It never touches a broker already running on the machine.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.mosquitto import LocalMosquitto, MosquittoNotAvailable, port_in_use  # noqa: E402

DEFAULT_PORT = 18830


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 stopped with Ctrl-C, 1 mosquitto missing or would not "
                                            "start, 2 the port is taken.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"loopback port (default {DEFAULT_PORT})")
    parser.add_argument("--dir", type=Path, default=Path.home() / ".local/share/edge-agent/broker",
                        help="where it keeps its data (default ~/.local/share/edge-agent/broker)")
    args = parser.parse_args(argv)
    if port_in_use(args.port):
        print(f"error: something already listens on 127.0.0.1:{args.port}; choose another with --port", file=sys.stderr)
        return 2
    broker = LocalMosquitto(args.dir, port=args.port)
    try:
        broker.start()
    except MosquittoNotAvailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Mosquitto on 127.0.0.1:{args.port}, data in {args.dir}. Ctrl-C stops it.\n"
          f"In another shell, point the agent at it:\n"
          f"    export AGENT_BROKER_HOST=127.0.0.1 AGENT_BROKER_PORT={args.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
