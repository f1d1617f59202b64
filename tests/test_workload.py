"""The workload phases both modes share: each phase's prompts have the shape its name promises,
are drawn from the pool, are the same whichever phases are picked, and `pdcheck run --workload`
picks them by name (default the boundary workload only, as before)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pdcheck.cli import build_parser
from pdcheck.errors import BadInput
from pdcheck.workload.boundary import boundary_lengths, boundary_workload
from pdcheck.workload.phases import BUILDERS, BURST, LOCAL, REPEATS, SHARED, local_workload, phases

POOL = range(100, 400)
BLOCK, MODEL_LEN, MAX_TOKENS = 16, 128, 8
LONGEST = MODEL_LEN - MAX_TOKENS


def by_name(seed: int = 0, names=tuple(BUILDERS)):
    return {p.name: p for p in phases(POOL, seed, BLOCK, MODEL_LEN, MAX_TOKENS, names)}


def prompts(phase) -> list[list[int]]:
    return [r.prompt for r in phase.requests]


def test_boundary_prompts_sit_on_block_edges_and_are_streamed_again_unchanged():
    every = by_name()
    assert [len(p) for p in prompts(every["boundary"])] == boundary_lengths(BLOCK, LONGEST)
    assert prompts(every["boundary-streamed"]) == prompts(every["boundary"]) and every["boundary-streamed"].stream


def test_repeated_phases_send_one_prompt_of_two_blocks_plus_one_again_and_again():
    every = by_name()
    for name, concurrent in (("repeated", False), ("repeated-concurrent", True)):
        sent = prompts(every[name])
        assert len(sent) == REPEATS and all(p == sent[0] for p in sent) and len(sent[0]) == 2 * BLOCK + 1
        assert every[name].concurrent is concurrent
    assert prompts(every["repeated"]) == prompts(every["repeated-concurrent"])


def test_shared_prefix_prompts_share_two_whole_blocks_and_end_in_a_partial_one():
    sent = prompts(by_name()["shared-prefix"])
    assert len(sent) == SHARED and all(p[: 2 * BLOCK] == sent[0][: 2 * BLOCK] for p in sent)
    assert all(2 * BLOCK < len(p) < 3 * BLOCK for p in sent)
    assert len({tuple(p[2 * BLOCK:]) for p in sent}) == SHARED


def test_burst_is_mixed_lengths_at_once_and_long_fills_the_model_length():
    every = by_name()
    assert every["burst"].concurrent and len(every["burst"].requests) == BURST
    assert all(1 <= len(p) <= LONGEST for p in prompts(every["burst"]))
    assert len({len(p) for p in prompts(every["burst"])}) > 1
    assert [len(p) for p in prompts(every["long"])] == [LONGEST, LONGEST - 1]


def test_every_prompt_is_drawn_from_the_pool_under_an_id_of_its_own():
    every = by_name()
    requests = [r for phase in every.values() for r in phase.requests]
    assert all(set(r.prompt) <= set(POOL) and r.max_tokens == MAX_TOKENS for r in requests)
    assert len({r.request_id for r in requests}) == len(requests)
    assert all(r.request_id.startswith(f"{name}-") and r.request_id.endswith(f"-len{len(r.prompt)}")
               for name, phase in every.items() for r in phase.requests)


def test_a_phase_picked_alone_sends_the_prompts_it_sends_among_all():
    every, again = by_name(seed=5), by_name(seed=5)
    assert {n: prompts(p) for n, p in every.items()} == {n: prompts(p) for n, p in again.items()}
    for name in BUILDERS:
        assert prompts(by_name(seed=5, names=[name])[name]) == prompts(every[name]), name
    assert prompts(by_name(seed=6)["burst"]) != prompts(every["burst"])


def test_a_model_length_with_no_room_for_two_blocks_plus_one_is_refused():
    with pytest.raises(BadInput, match="max_model_len 40"):
        phases(POOL, 0, BLOCK, 2 * BLOCK + MAX_TOKENS, MAX_TOKENS)


@pytest.fixture
def spec(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 300}))
    return SimpleNamespace(model=Path(model), block_size=BLOCK, max_model_len=MODEL_LEN)


def test_the_local_boundary_phase_is_the_gates_boundary_workload(spec):
    assert local_workload(spec, ["boundary"], 3, MAX_TOKENS) == boundary_workload(spec, 3, MAX_TOKENS)


def test_local_phases_come_in_the_order_named_after_the_boundary_workload(spec):
    requests = local_workload(spec, ["boundary", "shared-prefix", "long"], 0, MAX_TOKENS)
    boundary = boundary_workload(spec, 0, MAX_TOKENS)
    assert requests[: len(boundary)] == boundary
    rest = [r.request_id.split("-len")[0].rsplit("-", 1)[0] for r in requests[len(boundary):]]
    assert rest == ["shared-prefix"] * SHARED + ["long"] * 2
    assert all(4 <= t < 300 for r in requests for t in r.prompt)


def test_pdcheck_run_takes_the_boundary_workload_unless_told_otherwise():
    parser = build_parser()
    assert parser.parse_args(["run"]).workload == ("boundary",)
    picked = parser.parse_args(["run", "--workload", "boundary,shared-prefix,burst,long"]).workload
    assert picked == ("boundary", "shared-prefix", "burst", "long") and set(picked) <= set(LOCAL)


@pytest.mark.parametrize("text, message", [("boundary,bogus", "expected phases among"), ("", "expected phases"),
                                           ("long,long", "named twice"), ("boundary-streamed", "expected phases")])
def test_pdcheck_run_refuses_an_unknown_or_repeated_phase(text, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "--workload", text])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
