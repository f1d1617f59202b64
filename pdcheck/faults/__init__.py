"""Faults as packages (Jepsen's nemesis): each fault a name, `inject()` and `heal()`; a schedule
says when each is injected, and its `heal_all()` heals everything still injected (the final
heal, also after a failure). Faults enter only at seams: processes, the client, the wire.

- api.py: the two protocols, `Fault` and `FaultSchedule`;
- process.py: pauses, kills, restarts and abandoned batches of in-process instances, and
  `Nemesis`, the seeded schedule of them by batch (`pdcheck run --nemesis SEED`);
- hooks.py: the operator's shell commands (`--hook N:CMD`, `--heal N:CMD`) and `Hooks`, their
  schedule by workload request (black-box mode);
- client.py: faults a client causes: a stream aborted mid-way, a connection dropped;
- wire.py: faults on the reference connector's wire, at its client seams (`FaultyClient`).
"""
