"""The reference connector's transfer log never fails the engine that writes it: a write that
fails (folder removed mid-run, disk full, no permission) is one warning, then no log."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from pdcheck.connector.stats import TransferLog, TransferRecord, read_transfers

RECORD = TransferRecord(transfer_key="k", side="save", blocks=2, bytes=64, seconds=0.01)


def break_by_removing_its_folder(path: Path) -> None:
    shutil.rmtree(path.parent)


def break_by_taking_write_permission(path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes whatever the permissions say")
    path.chmod(0o400)


BREAKS = {"folder-removed": break_by_removing_its_folder, "no-permission": break_by_taking_write_permission}


@pytest.mark.parametrize("how", list(BREAKS))
def test_a_transfer_log_that_cannot_be_written_warns_once_and_never_raises(how, tmp_path, caplog):
    path = tmp_path / "run" / "transfers-1.jsonl"
    path.parent.mkdir()
    transfer_log = TransferLog(str(path))
    transfer_log.record(RECORD)
    assert read_transfers([path])["k"].saved_blocks == 2
    BREAKS[how](path)
    with caplog.at_level(logging.WARNING, logger="pdcheck.connector"):
        for _ in range(3):
            transfer_log.record(RECORD)  # an engine step that saved KV: must not raise
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "going on without it" in warnings[0], warnings


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_the_transfer_log_warns_once_and_never_raises(caplog):
    transfer_log = TransferLog("/dev/full")  # every write to it fails with ENOSPC
    with caplog.at_level(logging.WARNING, logger="pdcheck.connector"):
        transfer_log.record(RECORD)
        transfer_log.record(RECORD)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "/dev/full" in warnings[0], warnings


def test_a_transfer_log_whose_folder_never_existed_is_given_up_at_the_first_record(tmp_path, caplog):
    transfer_log = TransferLog(str(tmp_path / "missing" / "transfers-1.jsonl"))
    with caplog.at_level(logging.WARNING, logger="pdcheck.connector"):
        transfer_log.record(RECORD)
    assert transfer_log.is_given_up and len(caplog.records) == 1
