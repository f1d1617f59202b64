"""The single-instance mode's workload: a prompt, fillers enough to evict it from the pool, then
the prompt again alone and beside a filler; and bad input is exit 2 before any engine starts."""

from __future__ import annotations

from pdcheck.config import EngineSpec, model_path
from pdcheck.single import FIRST_LENS, MAX_TOKENS, NUM_BLOCKS, main, workload


def test_the_repeats_come_after_fillers_that_outgrow_the_pool():
    spec = EngineSpec(model=model_path("tiny-llama"), num_blocks=NUM_BLOCKS)
    phases = workload(spec)
    assert [concurrency for _, concurrency in phases] == [1, 1, 2]
    ids = [r.request_id for requests, _ in phases for r in requests]
    firsts = [f"first-len{n}" for n in FIRST_LENS]
    assert ids == firsts + [f"filler-{i}" for i in range(4)] + [f"{f}-again" for f in firsts] + [
        f"{firsts[-1]}-third", "filler-0-again"]
    prompts = {r.request_id: r.prompt for requests, _ in phases for r in requests}
    assert all(prompts[f] == prompts[f"{f}-again"] for f in firsts) and prompts["filler-0"] == prompts["filler-0-again"]
    blocks = lambda n: -(-(len(prompts[n]) + MAX_TOKENS) // spec.block_size)  # noqa: E731
    assert sum(blocks(f"filler-{i}") for i in range(4)) > NUM_BLOCKS - 1  # the fillers alone outgrow the pool


def test_an_unknown_model_is_bad_input(tmp_path, capsys):
    assert main(["--connector", "ExampleConnector", "--model", str(tmp_path / "nope"), "--runs-dir", str(tmp_path)]) == 2
    assert "no such model folder" in capsys.readouterr().err
