"""A seeded schedule of process and request faults, each an inject/heal pair with its window
in the history.

`plan(seed, num_batches)` picks, for a share `rate` of the batches, a fault of one of `kinds`:
- "prefill": the batch's prefill instance paused (SIGSTOP) between the two legs, so decode's
  pull meets a silent peer;
- "decode": the batch's decode instance paused as the batch starts;
- "abort": the client abandons the batch between the legs: decode never hears of it, and
  prefill must still free what it holds for it (a point fault: inject and heal at once);
- "kill": the batch's prefill instance is killed (SIGKILL) between the legs, so decode's load
  meets a dead peer; its deployment restarts it before its next batch (its heal);
- "restart": the batch's prefill instance is killed between the legs and started again on the
  same address before decode's leg is sent: decode meets a new incarnation that never had the
  request's KV (a peer restarted under stale metadata).
A pause lasts `seconds`; a timer thread heals it (SIGCONT) when its time is up, whatever the
batch is doing; `heal_all` heals anything still injected (the final heal, also on failure).
A request whose batch had a fault may end as a clean error (or a recompute, if the connector's
policy says so); it may never diverge, hang or leak.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading

from pdcheck.types import Planned

PAUSES = ("prefill", "decode")
KINDS = (*PAUSES, "abort")  # what `plan` draws from; "kill" is asked for by name


def plan(seed: int, num_batches: int, rate: float = 0.3, longest_s: float = 2.5,
         kinds: tuple[str, ...] = KINDS) -> list[Planned]:
    rng = random.Random(seed)
    faults = []
    for i in range(num_batches):
        if rng.random() < rate:
            target, seconds = rng.choice(kinds), round(rng.uniform(0.3, longest_s), 2)
            faults.append(Planned(i, target, 0.0 if target == "abort" else seconds))
    return faults


class Nemesis:
    def __init__(self, faults: list[Planned], history):
        self.faults = {f.batch: f for f in faults}
        self.history = history
        self.lock = threading.Lock()
        self.paused: dict[int, threading.Timer] = {}  # pid: its heal timer

    def faulted(self, batch: int) -> bool:
        return batch in self.faults

    def due(self, batch: int, stage: str, prefill, decode) -> bool:
        """Inject the batch's fault if it is due at `stage` ("start" or "between" the legs).
        True if the client abandons the batch here: its decode leg is not to be sent."""
        fault = self.faults.get(batch)
        if fault is None or stage != ("start" if fault.target == "decode" else "between"):
            return False
        if fault.target == "abort":
            for phase in ("inject", "heal"):
                self.history.record("note", fault="abort", phase=phase, batch=batch, instance=prefill.name)
            return True
        if fault.target in ("kill", "restart"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(prefill.process.pid, signal.SIGKILL)
            prefill.process.join(30)  # gone before decode's leg, so it is restarted before its next batch
            self.history.record("note", fault="kill", phase="inject", batch=batch, instance=prefill.name)
            if fault.target == "restart":
                prefill.restart()
                self.history.record("note", fault="kill", phase="heal", batch=batch, instance=prefill.name)
            return False
        self.inject(prefill if fault.target == "prefill" else decode, fault)
        return False

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
