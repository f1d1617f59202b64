"""Time and threads for the protocol model (pdcheck.testing.memory_transport): the real code's
threads run as actors one at a time on a clock the driver passes in, so a run is a function of
its driver's steps.

- `Loop`: each actor (a peer's engine step, a server's data connection) runs until it waits
  (`block`), then the driver runs the next runnable one; nothing else is ever concurrent.
  `crash(owner)` unwinds a peer's actors with `Crashed`.
- `Condition`: threading.Condition's wait and notify_all in the Loop's time.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable



class Crashed(BaseException):
    """Raised where a crashed peer's actor waits: it unwinds the real code past its except clauses."""


@dataclasses.dataclass(eq=False)
class Actor:
    owner: str  # the peer whose crash kills it
    name: str
    ready: Callable[[], bool] = lambda: True  # what it waits for
    wake_at: float | None = None  # when its wait times out (None: never)
    crashed: bool = False
    done: bool = False
    error: BaseException | None = None
    turn: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # released: its turn to run
    thread: threading.Thread | None = None


class Loop:
    """Runs actors one at a time, in spawn order, each until it waits (see the module docstring).
    A turn passes by releasing one lock the receiver waits on, so a switch wakes one thread."""

    WATCHDOG_S = 10.0  # real seconds an actor may run without waiting: more means it blocked outside the Loop
    MAX_SWITCHES = 10_000  # per settle: more means actors wake each other forever

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock  # what `block` timeouts are measured on: the model passes a FakeClock
        self.driver = threading.Lock()  # released: the driver's turn
        self.driver.acquire()
        self.running: Actor | None = None
        self.actors: list[Actor] = []

    def spawn(self, owner: str, name: str, body: Callable[[], None]) -> Actor:
        actor = Actor(owner, name)
        actor.turn.acquire()
        actor.thread = threading.Thread(target=self.run, args=(actor, body), name=f"pdcheck-model-{name}", daemon=True)
        self.actors.append(actor)
        actor.thread.start()
        return actor

    def run(self, actor: Actor, body) -> None:
        actor.turn.acquire()
        try:
            if not actor.crashed:
                body()
        except Crashed:
            pass
        except BaseException as e:  # handed to the driver by settle
            actor.error = e
        finally:
            actor.done = True
            self.driver.release()

    def block(self, ready: Callable[[], bool], timeout: float | None = None) -> None:
        """Called by an actor: wait until ready() or `timeout` seconds of the fake clock pass."""
        actor = self.running
        if actor is None or actor.thread is not threading.current_thread():
            raise RuntimeError("only an actor of this Loop can wait on the in-memory transport")
        actor.ready, actor.wake_at = ready, None if timeout is None else self.clock() + timeout
        self.driver.release()
        actor.turn.acquire()
        if actor.crashed:
            raise Crashed(actor.owner)

    def runnable(self, actor: Actor) -> bool:
        timed_out = actor.wake_at is not None and self.clock() >= actor.wake_at
        return not actor.done and (actor.crashed or timed_out or actor.ready())

    def settle(self) -> None:
        """Called by the driver: run runnable actors until none is; re-raise what one raised."""
        for _ in range(self.MAX_SWITCHES):
            actor = next((a for a in self.actors if self.runnable(a)), None)
            if actor is None:
                self.actors = [a for a in self.actors if not a.done]
                return
            self.running = actor
            actor.turn.release()
            if not self.driver.acquire(timeout=self.WATCHDOG_S):
                raise RuntimeError(f"actor {actor.name} blocked outside the in-memory transport")
            self.running = None
            if actor.error is not None:
                error, actor.error = actor.error, None
                raise error
        raise RuntimeError(f"actors still runnable after {self.MAX_SWITCHES} switches: a livelock")

    def crash(self, owner: str) -> None:
        for actor in self.actors:
            actor.crashed |= actor.owner == owner

    def stop(self) -> None:
        """End every actor (each unwinds as if crashed), so no thread outlives the run."""
        for actor in self.actors:
            actor.crashed = True
        self.settle()


class Condition:
    """threading.Condition's wait and notify_all in the Loop's time (what Inbox.take waits on)."""

    def __init__(self, loop: Loop):
        self.loop, self.generation = loop, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def wait(self, timeout: float | None = None) -> bool:
        generation = self.generation
        self.loop.block(lambda: self.generation != generation, timeout)
        return self.generation != generation

    def notify_all(self) -> None:
        self.generation += 1
