"""The demo: a private Mosquitto, the three-device example fleet, and the three paths.

    scripts/demo            (sets everything up, then runs this file)

1. board-npu asks: its own NPU is free, so it runs there without any network traffic.
2. phone asks: it has no NPU; board-npu's NPU is free, so board-npu wins the auction.
3. board-npu's NPU is taken (as a long job would), phone asks several times: the job goes
   to a CPU, chosen by LinUCB; it learns that the laptop is faster than the phone itself.

Every device is simulated (configs/fleet/, executor kind "sim"); the broker, the daemons
and the CLI are the real thing. Everything started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.locks import NpuLock  # noqa: E402
from tests.support.launch import ArrivalWatch, NodeProcess, stop_all  # noqa: E402
from tests.support.mosquitto import LocalMosquitto  # noqa: E402

FLEET = ["board-npu", "laptop", "phone"]
# The demo's own Python (.venv's): the printed commands name it, so they work when pasted
# into a shell that has not activated the virtualenv.
PYTHON = os.path.relpath(sys.executable, REPO) if Path(sys.executable).is_relative_to(REPO) else sys.executable
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def banner(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


class Demo:
    def __init__(self, workdir: Path, rounds: int):
        self.workdir = workdir
        self.rounds = rounds
        self.broker = LocalMosquitto(workdir / "mosquitto")
        self.nodes: list[NodeProcess] = []

    def settings(self, device: str) -> dict[str, str]:
        """What the demo sets for a device's processes: its private broker and state."""
        return {"AGENT_BROKER_PORT": str(self.broker.port), "AGENT_STATE_DIR": str(self.workdir / "state" / device)}

    def env(self, device: str) -> dict[str, str]:
        return {**os.environ, **self.settings(device), "PYTHONUNBUFFERED": "1"}

    def show(self, device: str | None, argv: list[str], suffix: str = "") -> None:
        """The command as it really runs, environment included, to copy and paste."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.settings(device).items()) + " " if device else ""
        print(f"{DIM}$ {env}{shlex.join(argv)}{suffix}{RESET}", flush=True)

    def start_fleet(self) -> None:
        banner(f"Mosquitto on 127.0.0.1:{self.broker.port} (mosquitto/dev.conf, private data dir)")
        self.broker.start()
        arrivals = ArrivalWatch(self.broker.host, self.broker.port)
        banner("Starting the fleet: " + ", ".join(FLEET))
        try:
            for device in FLEET:
                config = REPO / "configs" / "fleet" / f"{device}.yaml"
                node = NodeProcess(config, device, arrivals=arrivals, log=self.workdir / f"{device}.log",
                                   env=self.env(device))
                self.show(device, [PYTHON, "-m", "agent", "--role", "node", "--config",
                                   f"configs/fleet/{device}.yaml"], f" &   (log: {node.log})")
                node.start(timeout=20)
                self.nodes.append(node)
        finally:
            arrivals.close()
        print("all three devices online; they are simulated: each answers by echoing the prompt back")

    def trigger(self, device: str, prompt: str, *extra: str) -> int:
        cmd = [sys.executable, "-m", "agent", "trigger", "--config", f"configs/fleet/{device}.yaml", *extra, prompt]
        self.show(device, [PYTHON, *cmd[1:]])
        return subprocess.run(cmd, cwd=REPO, env=self.env(device)).returncode

    def mqtt_trigger(self) -> int:
        """The pattern for any MQTT client: a session that subscribes to the answer first
        (and keeps it while away), then the prompt with an id, then the answer."""
        if shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None:
            print("(mosquitto_pub/mosquitto_sub not installed: skipped)")
            return 0
        port = str(self.broker.port)
        session = ["-p", port, "-i", "kitchen-tablet", "-c", "-q", "1", "-t", "agent/laptop/answer/q1"]
        steps = [["mosquitto_sub", *session, "-E"],
                 ["mosquitto_pub", "-p", port, "-q", "1", "-t", "agent/laptop/trigger",
                  "-m", '{"prompt": "What is on the shopping list?", "id": "q1"}'],
                 ["mosquitto_sub", *session, "-C", "1", "-W", "30"]]
        out = ""
        for argv in steps:
            self.show(None, argv)
            out = subprocess.run(argv, capture_output=True, text=True, timeout=40).stdout
        print(out.strip())
        try:
            return 0 if json.loads(out).get("ok") else 1
        except ValueError:
            return 1

    def run(self) -> int:
        self.start_fleet()

        banner("1. board-npu asks, its own NPU is free -> runs locally, no network at all")
        failures = self.trigger("board-npu", "Summarise today's sensor readings in one line")

        banner("2. phone asks, it has no NPU -> auction, board-npu's free NPU wins")
        failures += self.trigger("phone", "Translate 'good morning' into French")

        banner("3. board-npu's NPU is busy -> CPU path, LinUCB picks; watch it learn")
        print("(holding board-npu's NPU lock, as a long Genie job would)")
        claim = NpuLock(self.workdir / "state" / "board-npu").try_acquire("demo-long-job")
        assert claim is not None
        with claim:
            for i in range(self.rounds):
                failures += self.trigger("phone", f"Question {i + 1}: what is the weather like on the edge?")

        banner("4. From Home Assistant or any MQTT client: a prompt on agent/<device>/trigger")
        failures += self.mqtt_trigger()

        banner("Fleet status")
        status = [sys.executable, "-m", "agent", "status", "--config", "configs/fleet/phone.yaml"]
        self.show("phone", [PYTHON, *status[1:]])
        subprocess.run(status, cwd=REPO, env=self.env("phone"))
        return 1 if failures else 0

    def stop(self) -> None:
        stop_all(self.nodes, timeout=10)
        self.broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="CPU-path triggers in step 3 (default 6)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, state)")
    parser.add_argument("--stay", action="store_true",
                        help="keep the broker and the fleet running until Ctrl-C, so that the commands the "
                             "demo printed can be pasted into another shell (from this directory)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    demo = Demo(workdir, args.rounds)
    try:
        code = demo.run()
        if args.stay:
            banner(f"The fleet stays up on 127.0.0.1:{demo.broker.port}: paste the commands above into another "
                   f"shell, in {REPO}. Ctrl-C stops everything.")
            threading.Event().wait()
    except KeyboardInterrupt:
        code = 130 if not args.stay else 0
    finally:
        demo.stop()
        if args.keep:
            print(f"\nlogs and state kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\ndemo finished: everything it started has been stopped" + ("" if code == 0 else " (with failures)"))
    if not args.stay:
        print("(to try the printed commands yourself, run scripts/demo --stay: the broker and the fleet then "
              "stay up until Ctrl-C)")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
