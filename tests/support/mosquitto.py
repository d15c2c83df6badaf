"""A throwaway local Mosquitto for the demo, the benchmarks, the soak and the tests.

It starts ``mosquitto`` from ``mosquitto/dev.conf`` on a port of our choosing, with its
persistence file in a directory of our own, and waits for the broker to say it is
running (no sleeps, no connection polling). ``restart()`` keeps the port and the
persistence directory, so sessions and queued messages survive it as in production.
"""

from __future__ import annotations

import getpass
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEV_CONF = REPO / "mosquitto" / "dev.conf"


class MosquittoNotAvailable(Exception):
    """No mosquitto binary, or it would not start (the message has its log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) == 0


class LocalMosquitto:
    def __init__(self, workdir: Path, *, port: int | None = None, conf: Path = DEV_CONF,
                 extra_conf: str = "", persistence: bool = True, listeners_as_written: bool = False):
        self.workdir = Path(workdir)
        self.persistence = persistence
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.conf = conf
        self.extra_conf = extra_conf
        # True: keep every listener of ``conf`` (its own ports; ``port`` is the one clients
        # use), as a provisioned broker has them; False: one listener, on ``port``.
        self.listeners_as_written = listeners_as_written
        self.log_lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        text = self.conf.read_text()
        if not self.listeners_as_written:
            text = re.sub(r"^listener .*$", f"listener {self.port} 127.0.0.1", text, flags=re.M)
        text = re.sub(r"^persistence_location .*$", f"persistence_location {self.workdir}/", text, flags=re.M)
        text = re.sub(r"^persistence .*$", f"persistence {'true' if self.persistence else 'false'}", text, flags=re.M)
        if not re.search(r"^persistence ", text, flags=re.M):  # a conf.d file: the main file would say
            text += f"\npersistence {'true' if self.persistence else 'false'}\npersistence_location {self.workdir}/\n"
        # "mosquitto version … running", which start() waits for, is an information line
        # on stderr.
        text = text.replace("log_type notice", "log_type notice\nlog_type information")
        if "log_dest" not in text:
            text += "\nlog_dest stderr\n"
        # Started as root, mosquitto would switch to the "mosquitto" user and could not
        # write its persistence file into our directory.
        return f"{text}\nuser {getpass.getuser()}\n{self.extra_conf}\n"

    def start(self, timeout: float = 10.0) -> None:
        if shutil.which("mosquitto") is None:
            raise MosquittoNotAvailable("mosquitto is not installed (apt-get install -y mosquitto)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        self.proc = proc
        ready = threading.Event()

        def read_log() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.log_lines.append(line)
                if "mosquitto version" in line and " running" in line:
                    ready.set()
            ready.set()  # it exited: start() reports that

        self._reader = threading.Thread(target=read_log, daemon=True, name="mosquitto-log")
        self._reader.start()
        if not ready.wait(timeout) or proc.poll() is not None:
            tail = "\n".join(self.log_lines[-10:])
            self.stop()
            raise MosquittoNotAvailable(f"mosquitto did not start on port {self.port}:\n{tail}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # The log reader ends at the pipe's end of file, which the broker's exit brings;
        # closing the pipe under a read in progress would fail that thread instead.
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(timeout=10)
        if proc.stderr is not None and (reader is None or not reader.is_alive()):
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> LocalMosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
