"""Operator hooks: shell commands the user passed (`--hook N:CMD`, `--heal N:CMD`), each run once,
before the N-th workload request of a black-box run.

A hook's command is a fault's inject and a heal's command a heal (`Command`); `Hooks` runs each
when its request is due, and `heal_all()` runs every heal not yet run, whatever happened. Both
are written to the history as steps of a `hook` fault: the report shades from a hook to the heal
after it.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from pdcheck.errors import BadInput
from pdcheck.faults.api import record


@dataclass(frozen=True)
class Hook:
    at: int  # run before this workload request (0-based)
    command: str
    heal: bool

    @classmethod
    def parse(cls, text: str, heal: bool) -> Hook:
        at, sep, command = text.partition(":")
        if not sep or not at.strip().isdigit() or not command.strip():
            raise BadInput(f"{'--heal' if heal else '--hook'} {text!r}: expected N:COMMAND (run before request N)")
        return cls(int(at), command.strip(), heal)


class Command:
    """One hook as a fault: `inject()` runs a hook's command, `heal()` a heal's; each runs once."""

    def __init__(self, hook: Hook, history, timeout_s: float = 60.0):
        self.hook, self.history, self.timeout_s = hook, history, timeout_s
        self.name = f"{'heal' if hook.heal else 'hook'}: {hook.command}"
        self.is_done = False

    def inject(self) -> None:
        if not self.hook.heal:
            self.run("inject")

    def heal(self) -> None:
        if self.hook.heal:
            self.run("heal")

    def run(self, phase: str) -> None:
        if self.is_done:
            return
        self.is_done = True
        started = time.monotonic()
        try:
            done = subprocess.run(self.hook.command, shell=True, capture_output=True, text=True,
                                  timeout=self.timeout_s)
            returncode, output = done.returncode, (done.stdout + done.stderr)[-500:]
        except subprocess.TimeoutExpired:
            returncode, output = None, f"still running after {self.timeout_s}s; stopped"
        record(self.history, "hook", phase, command=self.hook.command, before_request=self.hook.at,
               seconds=round(time.monotonic() - started, 3), returncode=returncode, output=output)


class Hooks:
    """The user's hooks and heals by workload request."""

    def __init__(self, hooks: list[Hook], history):
        self.hooks = hooks
        self.commands = [Command(hook, history) for hook in hooks]

    def before(self, indices) -> None:
        """Run the hooks and heals due before any of these workload requests."""
        wanted = set(indices)
        for command in self.commands:
            if command.hook.at in wanted and command.hook.heal:
                command.heal()
            elif command.hook.at in wanted:
                command.inject()

    def heal_all(self) -> None:
        """Every heal not yet run, now (the final heal, also after a failure)."""
        for command in self.commands:
            command.heal()
