"""A seeded schedule of process faults, each an inject/heal pair with its window in the history.

`plan(seed, num_batches)` picks, for a share `rate` of the batches, a fault (pause the batch's
prefill or decode instance with SIGSTOP) and how long it lasts. Prefill is paused between the
two legs, so decode's pull meets a silent peer; decode as the batch starts. `Nemesis.inject`
is called at both points and injects what is due there; a timer thread heals it (SIGCONT) when
its time is up, whatever the batch is doing; `heal_all` heals anything still injected (the
final heal, also on failure). A request whose batch had a fault may end as a clean error (or a
recompute, if the connector's policy says so); it may never diverge, hang or leak.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Planned:
    batch: int
    target: str  # "prefill" or "decode": which instance of the batch's pair is paused
    seconds: float


def plan(seed: int, num_batches: int, rate: float = 0.3, longest_s: float = 2.5) -> list[Planned]:
    rng = random.Random(seed)
    return [Planned(i, rng.choice(["prefill", "decode"]), round(rng.uniform(0.3, longest_s), 2))
            for i in range(num_batches) if rng.random() < rate]


class Nemesis:
    def __init__(self, faults: list[Planned], history):
        self.faults = {f.batch: f for f in faults}
        self.history = history
        self.lock = threading.Lock()
        self.paused: dict[int, threading.Timer] = {}  # pid: its heal timer

    def faulted(self, batch: int) -> bool:
        return batch in self.faults

    def due(self, batch: int, stage: str, prefill, decode) -> None:
        """Inject the batch's fault if it is due at `stage` ("start" or "between" the legs)."""
        fault = self.faults.get(batch)
        if fault is not None and stage == ("between" if fault.target == "prefill" else "start"):
            self.inject(prefill if fault.target == "prefill" else decode, fault)

    def inject(self, instance, fault: Planned) -> None:
        pid = instance.process.pid
        with self.lock:
            os.kill(pid, signal.SIGSTOP)
            self.history.record("note", fault="pause", phase="inject", batch=fault.batch, instance=instance.name,
                                seconds=fault.seconds)
            timer = threading.Timer(fault.seconds, self.heal, args=(pid, instance.name, fault.batch))
            timer.daemon = True
            self.paused[pid] = timer
            timer.start()

    def heal(self, pid: int, name: str, batch: int) -> None:
        with self.lock:
            if self.paused.pop(pid, None) is None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.history.record("note", fault="pause", phase="heal", batch=batch, instance=name)

    def heal_all(self) -> None:
        for pid, timer in list(self.paused.items()):
            timer.cancel()
            self.heal(pid, "", -1)
