"""This device's own prompts: MQTT triggers and the local control socket, one path.

Theory of operation. A prompt that starts on this device — a Home Assistant automation
or ``mosquitto_pub`` on ``trigger/<device>``, or ``trigger``/``serve``/``status`` of this
device over the control socket (agent/control.py) — is orchestrated here, by an
orchestrator built with ``orchestrator()``, the one factory every front uses (the node,
a ``trigger`` without a daemon, ``serve``). MQTT triggers go through a fixed pool of
workers with a bounded line behind it (``trigger-N`` threads); control requests run on
the control server's request threads, bounded by the same total.

Answers to MQTT triggers go on ``last_result`` (retained, for dashboards), on the
trigger's own answer topic if it had an id, and on its MQTT 5 response topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from agent.bus import Message, Publish
from agent.config import Config
from agent.control import (
    Channel,
    ControlServer,
    Decision,
    Failure,
    ForgetRequest,
    Outcome,
    Progress,
    Request,
    Status,
    StatusRequest,
    Text,
)
from agent.errors import AgentError, ExitCode, MessageError
from agent.gate import Gate
from agent.messages import LastResult, Snapshot, TriggerRequest
from agent.topics import Topics

log = logging.getLogger("agent.node")  # the daemon's parts log under its name


def orchestrator(cfg: Config, *, connect: Callable[[], Any], npu_exec: Any, cpu_exec: Any,
                 local_snapshot: Callable[[], Snapshot], **hooks: Any) -> Any:
    """An orchestrator for this device (the only place one is built): its executors, its
    arm store, its own snapshot as a candidate; ``hooks`` are the on_token/on_decision/
    on_progress callbacks."""
    from agent.armstore import ArmStore  # numpy: imported only when an auction decides
    from agent.orchestrator import Orchestrator
    return Orchestrator(cfg, connect=connect, npu_exec=npu_exec, cpu_exec=cpu_exec,
                        arms=lambda: ArmStore.for_config(cfg), local_snapshot=local_snapshot, **hooks)


Make = Callable[..., Any]  # (cfg, **hooks) -> Orchestrator


class Fronts:
    def __init__(self, cfg: Config, topics: Topics, *, publish: Publish, make: Make, fleet: Callable[[], Any],
                 wall: Callable[[], float] = time.time):
        self.cfg = cfg
        self.me = cfg.device_id
        self.topics = topics
        self._publish = publish
        self._make = make
        self._fleet = fleet
        self._wall = wall
        # MQTT/Home Assistant prompts: a fixed pool of orchestrations, a bounded line behind it.
        self.triggers: Gate[tuple[TriggerRequest, str | None]] = Gate(
            cfg.triggers.workers, cfg.triggers.max_waiting, lambda item, _: self._orchestrate(*item),
            expected=lambda item: 0.0, name="trigger")
        # This device's own trigger/status processes come through here, not the broker.
        self.control = ControlServer(cfg.state_dir, self.on_control)
        self._control_busy = threading.Semaphore(cfg.triggers.workers + cfg.triggers.max_waiting)

    def start(self) -> None:
        self.triggers.start()
        self.control.start()

    def stop(self) -> None:
        self.control.stop()
        self.triggers.stop(timeout=1.0)

    # ---------------------------------------------------------------- MQTT triggers (HA, mosquitto_pub)
    def on_trigger(self, msg: Message) -> None:
        try:
            req = TriggerRequest.from_payload(msg.payload, self.cfg.max_payload_bytes)
        except MessageError as exc:
            log.warning("dropped trigger on %s: %s", msg.topic, exc)
            # Whoever gave an id (or a response topic) is waiting: tell them why. (Not on
            # last_result: garbage from anyone must not replace a dashboard's answer.)
            reply_id = TriggerRequest.reply_id(msg.payload, msg.correlation_data)
            if reply_id is not None or msg.response_topic:
                self._answer(TriggerRequest("-", id=reply_id), msg.response_topic, LastResult(
                    rid="-", device=self.me, winner=None, path=None, ok=False, text="", total_ms=0.0, id=reply_id,
                    error=f"bad trigger: {exc}"), dashboard=False)
            return
        if req.id is None:
            req = replace(req, id=TriggerRequest.reply_id(b"", msg.correlation_data))
        if self.triggers.offer((req, msg.response_topic)) is None:
            log.warning("trigger refused: %d already running or waiting", self.triggers.depth)
            self._answer(req, msg.response_topic, LastResult(
                rid="-", device=self.me, winner=None, path=None, ok=False, text="", total_ms=0.0, id=req.id,
                error=f"busy: {self.triggers.depth} prompts are already running or waiting on this device; "
                      "try again later"))

    def _orchestrate(self, req: TriggerRequest, response_topic: str | None) -> None:
        orch = self._make(self.cfg)
        try:
            ask = req.ask()
            out = orch.run(ask.prompt, max_new_tokens=ask.max_new_tokens, model=ask.model)
        except AgentError as exc:
            log.warning("trigger refused: %s", exc)
            last = LastResult(rid="-", device=self.me, winner=None, path=None, ok=False, text="", error=str(exc),
                              total_ms=0.0, id=req.id)
        else:
            log.info("trigger %s: %s via %s in %.0f ms", out.rid, "answered" if out.ok else "failed",
                     out.path, out.total_ms)
            last = LastResult(rid=out.rid, device=self.me, winner=out.winner, path=out.path, ok=out.ok,
                              text=out.text, error=out.error, total_ms=round(out.total_ms, 1), id=req.id)
        self._answer(req, response_topic, last)

    def _answer(self, req: TriggerRequest, response_topic: str | None, last: LastResult, *,
                dashboard: bool = True) -> None:
        """On last_result (retained, for dashboards), on the trigger's own answer topic if
        it had an id, and on its MQTT 5 response topic if it named one."""
        payload = last.to_payload()
        if dashboard:
            self._publish(self.topics.last_result(self.me), payload, retain=True)
        if req.id is not None:
            self._publish(self.topics.answer(self.me, req.id), payload)
        if response_topic:
            self._publish(response_topic, payload)

    # ---------------------------------------------------------------- the local control socket
    def on_control(self, request: Request, channel: Channel) -> None:
        """A trigger or status request from a process of this device (agent/control.py)."""
        if isinstance(request, StatusRequest):
            from agent.status import rows
            channel.send(Status(rows(self._fleet().roster, self._wall())))
            return
        if isinstance(request, ForgetRequest):
            from agent.fleet import forget
            if request.device == self.me:
                channel.send(Failure("forget: a device id other than this node's", ExitCode.USAGE))
                return
            channel.send(forget(self._fleet(), request.device, force=request.force))
            return
        ask = request.ask
        if not self._control_busy.acquire(blocking=False):
            channel.send(Failure("busy: too many prompts are running or waiting on this device; try again later",
                                 ExitCode.FAILED))
            return
        try:
            cfg = self.cfg
            if ask.bid_timeout_s is not None:
                cfg = replace(cfg, auction=replace(cfg.auction, bid_timeout_s=ask.bid_timeout_s))
            orch = self._make(cfg, on_token=lambda text: channel.send(Text(text)),
                              on_decision=lambda d: channel.send(Decision(d.winner, d.path, d.score)),
                              on_progress=lambda text: channel.send(Progress(text)))
            channel.watch(orch.interrupt)  # the client hung up (Ctrl-C): cancel its job
            out = orch.run(ask.prompt, max_new_tokens=ask.max_new_tokens, need=ask.need, dry_run=ask.dry_run,
                           model=ask.model, temperature=ask.temperature, chat=ask.chat)
        except AgentError as exc:
            channel.send(Failure(str(exc), exc.exit_code))
        else:
            channel.send(Outcome(out.to_json(), out.answer.kind))
        finally:
            self._control_busy.release()
