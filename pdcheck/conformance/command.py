"""`pdcheck test`: the battery through pytest, in this process, from any folder.

The options are checked first (the connector resolved to its class and profile, the models
found), so bad input is exit 2 before anything starts. Then pytest runs `--pyargs
pdcheck.conformance` with the matching `--pd-*` options and the arguments given after `--`.
Exit codes: 0 every test passed (or was skipped), 1 a test failed, 2 bad input or a run that
could not be made (nothing collected, a usage error, an internal error), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

import pytest

from pdcheck.config import connector_spec, model_path


def pytest_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--pyargs", "pdcheck.conformance", "-p", "no:cacheprovider", "--basetemp", str(args.runs_dir / "battery"),
            "--pd-connector", args.connector]
    for flag, value in (("--pd-connector-config", args.connector_config), ("--pd-profile", args.profile),
                        ("--pd-decode-prompt", args.decode_prompt)):
        if value is not None:
            argv += [flag, value]
    argv += [x for m in args.model or [] for x in ("--pd-model", m)]
    argv += [x for d in args.dtype or [] for x in ("--pd-dtype", d)]
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    return argv + extra


def run_battery(args: argparse.Namespace) -> int:
    connector_spec(args.connector, args.connector_config, args.decode_prompt, args.profile)
    for model in args.model or []:
        model_path(model)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    code = int(pytest.main(pytest_argv(args)))
    if code in (0, 1):
        return code
    if code == int(pytest.ExitCode.INTERRUPTED):
        return 130
    print(f"pdcheck: error: the battery could not run (pytest exit code {code})", file=sys.stderr)
    return 2
