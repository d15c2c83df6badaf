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
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.locks import NpuLock  # noqa: E402
from tests.support.launch import ArrivalWatch, NodeProcess  # noqa: E402
from tests.support.mosquitto import LocalMosquitto  # noqa: E402

FLEET = ["board-npu", "laptop", "phone"]
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def banner(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


class Demo:
    def __init__(self, workdir: Path, rounds: int):
        self.workdir = workdir
        self.rounds = rounds
        self.broker = LocalMosquitto(workdir / "mosquitto")
        self.nodes: list[NodeProcess] = []

    def env(self, device: str) -> dict[str, str]:
        return {**os.environ, "AGENT_BROKER_HOST": self.broker.host,
                "AGENT_BROKER_PORT": str(self.broker.port),
                "AGENT_STATE_DIR": str(self.workdir / "state" / device), "PYTHONUNBUFFERED": "1"}

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
                print(f"{DIM}$ python -m agent --role node --config configs/fleet/{device}.yaml &   "
                      f"(log: {node.log}){RESET}")
                node.start(timeout=20)
                self.nodes.append(node)
        finally:
            arrivals.close()
        print("all three devices online")

    def trigger(self, device: str, prompt: str, *extra: str) -> int:
        cmd = [sys.executable, "-m", "agent", "trigger", "--config", f"configs/fleet/{device}.yaml", *extra, prompt]
        print(f"{DIM}$ {shlex.join(['python', *cmd[1:]])}{RESET}", flush=True)
        return subprocess.run(cmd, cwd=REPO, env=self.env(device)).returncode

    def run(self) -> int:
        self.start_fleet()

        banner("1. board-npu asks, its own NPU is free -> runs locally, no network at all")
        failures = self.trigger("board-npu", "Summarise today's sensor readings in one line")

        banner("2. phone asks, it has no NPU -> auction, board-npu's free NPU wins")
        failures += self.trigger("phone", "Translate 'good morning' into French")

        banner("3. board-npu's NPU is busy -> CPU path, LinUCB picks; watch it learn")
        print("(holding board-npu's NPU lock, as a long Genie job would)")
        claim = NpuLock(self.workdir / "state" / "board-npu").try_claim("demo-long-job")
        assert claim is not None
        with claim:
            for i in range(self.rounds):
                failures += self.trigger("phone", f"Question {i + 1}: what is the weather like on the edge?")

        banner("Fleet status")
        subprocess.run([sys.executable, "-m", "agent", "status", "--config", "configs/fleet/phone.yaml"],
                       cwd=REPO, env=self.env("phone"))
        return 1 if failures else 0

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(timeout=10)
        self.broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="CPU-path triggers in step 3 (default 6)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, state)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    demo = Demo(workdir, args.rounds)
    try:
        code = demo.run()
    except KeyboardInterrupt:
        code = 130
    finally:
        demo.stop()
        if args.keep:
            print(f"\nlogs and state kept in {workdir}")
        else:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    print("\ndemo finished: everything it started has been stopped" + ("" if code == 0 else " (with failures)"))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
