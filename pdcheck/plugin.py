"""The pytest face of pdcheck: options, markers, skips and session-scoped deployments.

    pytest suites/ --pd-connector=ExampleConnector --pd-model tiny-llama --pd-dtype bfloat16

Options: --pd-connector (a vLLM built-in name, module:Class or file.py:Class; the reference
connector by default), --pd-connector-config (JSON), --pd-profile (a file overriding the
connector's profile), --pd-decode-prompt, --pd-model and --pd-dtype (repeatable),
--runslow; black-box mode against a running deployment: --pd-target, --pd-oracle, --pd-metrics
(suites/test_blackbox.py runs `pdcheck run --target --oracle` on them). Markers: gpu, multi_gpu(n), slow, vllm. Tests that need what this machine lacks
(vLLM, a GPU, n GPUs) are skipped with the reason. Under pytest-xdist each worker has its own
run folder, so instances never share folders.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from pdcheck.config import DTYPES, ConnectorSpec, EngineSpec, connector_spec, model_path
from pdcheck.errors import BadInput

DEFAULT_MODELS = ["tiny-llama", "tiny-qwen3-moe"]


def pytest_addoption(parser):
    group = parser.getgroup("pdcheck", "PD serving correctness gate")
    group.addoption("--pd-connector", default="reference", help="connector under test (default: pdcheck's reference)")
    group.addoption("--pd-connector-config", default=None, help="JSON kv_connector_extra_config")
    group.addoption("--pd-profile", default=None, help="a JSON or TOML file overriding the connector's profile")
    group.addoption("--pd-decode-prompt", default=None, choices=["original", "with_first_token"])
    group.addoption("--pd-model", action="append", default=None, help="model folder or embedded name")
    group.addoption("--pd-dtype", action="append", default=None, choices=DTYPES)
    group.addoption("--runslow", action="store_true", help="run tests marked slow")
    group.addoption("--pd-target", default=None, help="black-box: a PD deployment's OpenAI-compatible URL")
    group.addoption("--pd-oracle", default=None, help="black-box: its single-node baseline's URL")
    group.addoption("--pd-metrics", action="append", default=None, help="black-box: a vLLM server's URL behind the target")


def pytest_configure(config):
    for line in ("gpu: needs a CUDA GPU", "multi_gpu(n): needs n CUDA GPUs",
                 "slow: long-running; runs with --runslow", "vllm: needs vLLM installed"):
        config.addinivalue_line("markers", line)


def cuda_device_count() -> int:
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


SESSION_FIXTURES = {"pd_pool", "pd_run_dir", "pd_history"}
ENGINES = "engines"  # the xdist group of the tests on those fixtures


def replay_line(request) -> str:
    """The command that reruns just this test, for its failure message (without the group
    suffix xdist's loadgroup adds to node ids, which pytest would not find)."""
    return f"replay: python -m pytest '{request.node.nodeid.removesuffix('@' + ENGINES)}' -p no:cacheprovider -q"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (it names each item by its group)
def pytest_collection_modifyitems(config, items):
    has_vllm = importlib.util.find_spec("vllm") is not None
    gpus = None
    for item in items:
        if item.get_closest_marker("slow") and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if item.get_closest_marker("vllm") and SESSION_FIXTURES & set(getattr(item, "fixturenames", ())):
            # under `pytest -n 2 --dist loadgroup`, the tests on the session's engines (its pool of
            # deployments, its run folder) run in one worker, in order, so there is one pool and
            # memory stays bounded; tests that start engines of their own (through the CLI) or
            # none run in the other worker beside them
            item.add_marker(pytest.mark.xdist_group(ENGINES))
        if item.get_closest_marker("vllm") and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="vLLM is not installed (pip install 'pdcheck[cpu]')"))
        needed = gpu_need(item)
        if needed:
            gpus = cuda_device_count() if gpus is None else gpus
            if gpus < needed:
                item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA GPU(s), found {gpus}"))


def gpu_need(item) -> int:
    multi = item.get_closest_marker("multi_gpu")
    if multi:
        return int(multi.args[0]) if multi.args else 2
    return 1 if item.get_closest_marker("gpu") else 0


CONNECTOR = pytest.StashKey[ConnectorSpec]()


def connector_under_test(config) -> ConnectorSpec:
    """The connector the options name, resolved to its class and profile once per session."""
    if CONNECTOR not in config.stash:
        try:
            config.stash[CONNECTOR] = connector_spec(
                config.getoption("--pd-connector"), config.getoption("--pd-connector-config"),
                config.getoption("--pd-decode-prompt"), config.getoption("--pd-profile"),
            )
        except BadInput as e:
            raise pytest.UsageError(str(e)) from None
    return config.stash[CONNECTOR]


def engine_specs(config) -> list[EngineSpec]:
    """One EngineSpec per (model, dtype) named by the options, with the connector under test."""
    connector = connector_under_test(config)
    try:
        models = [model_path(m) for m in config.getoption("--pd-model") or DEFAULT_MODELS]
    except BadInput as e:
        raise pytest.UsageError(str(e)) from None
    return [EngineSpec(model=m, dtype=d, connector=connector) for m in models for d in config.getoption("--pd-dtype") or DTYPES]


@pytest.fixture(scope="session")
def pd_run_dir(tmp_path_factory):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return tmp_path_factory.mktemp(f"pdcheck-{worker}")


@pytest.fixture(scope="session")
def pd_pool(pd_run_dir):
    """Deployments shared by the session (at most two alive), all stopped at its end."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install 'pdcheck[cpu]')")
    from pdcheck.cluster.pool import DeploymentPool

    pool = DeploymentPool(pd_run_dir)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pd_history(pd_run_dir):
    from pdcheck.history import History

    history = History(pd_run_dir / "history.jsonl")
    yield history
    history.close()
