"""Black-box mode against deployments pdcheck did not start (it starts them here only to have
something to point at): bad input is refused before any load, and a broken connector held back
behind the target is caught from outside.

The passing run (every phase, client faults, a pause hook) is in test_http_deployment.py, on
that module's 2P2D deployment.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pdcheck.cli import main
from pdcheck.config import EngineSpec, connector_spec, model_path


class ModelList(BaseHTTPRequestHandler):
    """An OpenAI-style server that lists one model and answers nothing else."""

    model = "some-other-model"

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": self.model}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body if self.path == "/v1/models" else b"")

    def log_message(self, *args):
        pass


class NotOpenAI(ModelList):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"<html>a web page</html>")


@pytest.fixture
def http_server():
    servers = []

    def start(handler) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run(tmp_path, capture, *argv) -> tuple[int, str]:
    code = main(["run", "--runs-dir", str(tmp_path / "runs"), *argv])
    return code, capture.readouterr().err


def test_bad_endpoints_are_refused_before_any_load(http_server, tmp_path, capsys):
    other, page = http_server(ModelList), http_server(NotOpenAI)
    cases = [
        (["--target", "http://127.0.0.1:9", "--oracle", other], "not reachable"),
        (["--target", page, "--oracle", other], "not an OpenAI-compatible server"),
        (["--target", other, "--oracle", other, "--model", "tiny-llama"], "does not serve model 'tiny-llama'"),
        (["--target", other, "--oracle", other, "--max-requests", "0"], "must be positive"),
        (["--target", other], "needs both --target and --oracle"),
        (["--target", other, "--oracle", other, "--hook", "soon:kill -STOP 1"], "expected N:COMMAND"),
    ]
    for argv, message in cases:
        code, err = run(tmp_path, capsys, *argv)
        assert code == 2 and message in err, (argv, err)
    assert not (tmp_path / "runs").exists(), "a run folder was made: load may have been sent"


@pytest.mark.slow  # the default gate's black-box negative control is in test_http_deployment.py (a relay)
@pytest.mark.vllm
def test_a_broken_connector_behind_the_target_is_caught_from_outside(pd_run_dir, pd_pool, tmp_path, capsys):
    """The reference connector with its loads damaged (CorruptOnLoad) serves behind the proxy;
    the black-box run finds divergence and exits 1. A plan over budget is refused first."""
    from pdcheck.cluster.http_cluster import ServedCluster

    pd_pool.release()  # room for the served instances

    reference = connector_spec("reference")
    broken = connector_spec("pdcheck.mutants.connector:CorruptOnLoad", json.dumps(dict(reference.extra_config)))
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16", connector=broken)
    with ServedCluster(spec, pd_run_dir / "served-broken") as cluster:
        target = ["--target", cluster.proxy.url, "--oracle", cluster.oracle.url]
        code, err = run(tmp_path, capsys, *target, "--max-requests", "50")
        assert code == 2 and "over the budget of 50" in err, err
        code, err = run(tmp_path, capsys, *target, "--metrics", cluster.decodes[0].url)
    assert code == 1, err
    results = json.loads((tmp_path / "runs" / "latest" / "results.json").read_text())
    outcomes = [r["verdict"]["outcome"] for c in results["configs"] for r in c["requests"]]
    assert outcomes.count("diverged") >= len(outcomes) // 2, outcomes


def test_the_deployment_named_by_the_options_matches_its_oracle(pytestconfig, tmp_path, capfd):
    """`pytest suites/test_blackbox.py --pd-target URL --pd-oracle URL [--pd-metrics URL ...]`."""
    target, oracle = pytestconfig.getoption("--pd-target"), pytestconfig.getoption("--pd-oracle")
    if not (target and oracle):
        pytest.skip("no deployment named: pass --pd-target and --pd-oracle")
    metrics = [arg for url in pytestconfig.getoption("--pd-metrics") or [] for arg in ("--metrics", url)]
    code, err = run(tmp_path, capfd, "--target", target, "--oracle", oracle, *metrics)
    assert code == 0, err
