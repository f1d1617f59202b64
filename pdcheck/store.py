"""Run folders: `<runs>/<timestamp>-<pid>/` with history.jsonl written as the run goes,
results.json written last, and a `latest` link to the newest run. `read_results` reads a run
folder's results.json back as the RunResults it was written from."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from pdcheck.history import History
from pdcheck.types import RunResults


class RunStore:
    def __init__(self, runs_dir: Path):
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.folder = runs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.folder.mkdir()
        latest = runs_dir / "latest"
        tmp_link = runs_dir / f".latest-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(self.folder.name)
        tmp_link.replace(latest)
        self.history = History(self.folder / "history.jsonl")

    def write_results(self, results: RunResults) -> Path:
        path = self.folder / "results.json"
        path.write_bytes(msgspec.json.format(msgspec.json.encode(results)))
        return path

    def close(self) -> None:
        self.history.close()


def read_results(folder: Path) -> RunResults:
    path = Path(folder) / "results.json"
    try:
        return msgspec.json.decode(path.read_bytes(), type=RunResults)
    except msgspec.DecodeError as error:
        raise ValueError(f"{path}: not a run's results: {error}") from None
