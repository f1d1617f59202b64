"""Process faults on a batch's instances, and `Nemesis`: a seeded schedule of them by batch.

`plan(seed, num_batches)` picks, for a share `rate` of the batches, a fault of one of `kinds`
(FaultKind): prefill paused between the two legs (decode's pull meets a silent peer), decode
paused as the batch starts, or the batch abandoned between the legs; KILL and RESTART are asked
for by name. The faults:
- `Pause`: SIGSTOP for `seconds`; a timer heals it (SIGCONT) when its time is up, whatever the
  batch is doing;
- `Kill`: SIGKILL, so decode's load meets a dead peer; its heal is its deployment's, which
  starts it again before its next batch (or before the drain);
- `Restart`: killed, then started again on the same address before decode's leg: decode meets a
  new incarnation that never had the request's KV (a peer restarted under stale metadata);
- `Abort`: the client abandons the batch: decode never hears of it, and prefill must still free
  what it holds for it (a point fault).
A request whose batch had a fault may end as a clean error (or a recompute, if the connector's
policy says so); it may never diverge, hang or leak.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading

from pdcheck.faults.api import Fault, record
from pdcheck.types import FaultKind, Planned

PAUSES = (FaultKind.PAUSE_PREFILL, FaultKind.PAUSE_DECODE)
KINDS = (*PAUSES, FaultKind.ABORT)  # what `plan` draws from; KILL and RESTART are asked for by name
POINTS = (FaultKind.ABORT, FaultKind.RESTART)  # healed as soon as injected


def plan(seed: int, num_batches: int, rate: float = 0.3, longest_s: float = 2.5,
         kinds: tuple[FaultKind, ...] = KINDS) -> list[Planned]:
    rng = random.Random(seed)
    faults = []
    for i in range(num_batches):
        if rng.random() < rate:
            kind, seconds = FaultKind(rng.choice(kinds)), round(rng.uniform(0.3, longest_s), 2)
            faults.append(Planned(i, kind, seconds if kind in PAUSES else 0.0))
    return faults


class Pause:
    """The instance's process stopped for `seconds`; healed by its timer or by `heal()`."""

    def __init__(self, instance, seconds: float, batch: int, history):
        self.instance, self.seconds, self.batch, self.history = instance, seconds, batch, history
        self.name = f"pause {instance.name}"
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def inject(self) -> None:
        with self.lock:
            os.kill(self.instance.process.pid, signal.SIGSTOP)
            record(self.history, "pause", "inject", batch=self.batch, instance=self.instance.name, seconds=self.seconds)
            self.timer = threading.Timer(self.seconds, self.heal)
            self.timer.daemon = True
            self.timer.start()

    def heal(self) -> None:
        with self.lock:
            if self.timer is None:
                return
            self.timer.cancel()
            self.timer = None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.instance.process.pid, signal.SIGCONT)
            record(self.history, "pause", "heal", batch=self.batch, instance=self.instance.name)


class Kill:
    """The instance's process killed, and gone before `inject` returns. Its deployment starts it
    again before its next batch: `heal()` has nothing to do."""

    def __init__(self, instance, batch: int, history):
        self.instance, self.batch, self.history = instance, batch, history
        self.name = f"kill {instance.name}"

    def inject(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.instance.process.pid, signal.SIGKILL)
        self.instance.process.join(30)
        record(self.history, "kill", "inject", batch=self.batch, instance=self.instance.name)

    def heal(self) -> None:
        pass


class Restart(Kill):
    """Killed, then started again on the same address by `heal()`."""

    def __init__(self, instance, batch: int, history):
        super().__init__(instance, batch, history)
        self.name, self.is_killed = f"restart {instance.name}", False

    def inject(self) -> None:
        super().inject()
        self.is_killed = True

    def heal(self) -> None:
        if self.is_killed:
            self.is_killed = False
            self.instance.restart()
            record(self.history, "kill", "heal", batch=self.batch, instance=self.instance.name)


class Abort:
    """The client abandons the batch (the schedule tells the caller not to send decode's leg)."""

    def __init__(self, instance, batch: int, history):
        self.instance, self.batch, self.history = instance, batch, history
        self.name, self.is_injected = f"abort batch {batch}", False

    def inject(self) -> None:
        self.is_injected = True
        record(self.history, "abort", "inject", batch=self.batch, instance=self.instance.name)

    def heal(self) -> None:
        if self.is_injected:
            self.is_injected = False
            record(self.history, "abort", "heal", batch=self.batch, instance=self.instance.name)


def make(planned: Planned, prefill, decode, history) -> Fault:
    """The fault a plan asks for, on the batch's pair."""
    kind = FaultKind(planned.target)
    if kind is FaultKind.PAUSE_PREFILL:
        return Pause(prefill, planned.seconds, planned.batch, history)
    if kind is FaultKind.PAUSE_DECODE:
        return Pause(decode, planned.seconds, planned.batch, history)
    return {FaultKind.ABORT: Abort, FaultKind.KILL: Kill, FaultKind.RESTART: Restart}[kind](
        prefill, planned.batch, history)


class Nemesis:
    """The planned faults by batch. The gate calls `due` as each batch starts and between its
    legs, asks `faulted` when judging, and `heal_all` once it is done (also after a failure)."""

    def __init__(self, faults: list[Planned], history):
        self.planned = {f.batch: f for f in faults}
        self.history = history
        self.injected: list[Fault] = []

    def faulted(self, batch: int) -> bool:
        return batch in self.planned

    def due(self, batch: int, stage: str, prefill, decode) -> bool:
        """Inject the batch's fault if it is due at `stage` ("start" or "between" the legs).
        True if the client abandons the batch here: its decode leg is not to be sent."""
        planned = self.planned.get(batch)
        kind = FaultKind(planned.target) if planned else None
        if kind is None or stage != ("start" if kind is FaultKind.PAUSE_DECODE else "between"):
            return False
        fault = make(planned, prefill, decode, self.history)
        self.injected.append(fault)
        fault.inject()
        if kind in POINTS:
            fault.heal()
        return kind is FaultKind.ABORT

    def heal_all(self) -> None:
        for fault in self.injected:
            fault.heal()
