"""Message faults: the reference connector's worker halves under wire faults (no vLLM).

A prefill half and a decode half move requests over real ZMQ sockets while a seeded schedule
drops, delays, duplicates or corrupts their messages at the client seam. For every request:
either its blocks arrive bit for bit and no load error is reported, or a load error names
exactly its blocks and nothing was written into them. Faults never leak into later requests:
a request with no fault (or only a delay) always arrives.
"""

from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")
zmq = pytest.importorskip("zmq")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pdcheck.cluster.instance import free_port  # noqa: E402
from pdcheck.connector.config import P2PConfig  # noqa: E402
from pdcheck.connector.worker import LoadEntry, SaveEntry, WorkerHalf  # noqa: E402
from pdcheck.faults.wire import FaultyClient, UncheckedClient, WireFault as Fault  # noqa: E402

DEADLINE_S = 0.15
BLOCKS_PER_REQUEST = 2


def half(mode: str, schedule: list[Fault], client=FaultyClient) -> WorkerHalf:
    config = P2PConfig.from_extra({"port": free_port(), "mode": mode, "deadline_s": DEADLINE_S})
    return WorkerHalf(config, client_factory=lambda context: client(context, schedule, delay_s=0.02))


def run(mode: str, faults: list[Fault], seed: int, client=FaultyClient, ended: list[str] | None = None) -> list[str]:
    """Move len(faults) requests; the faults hit the side that sends requests in this mode.
    `ended`, if given, gets "arrived" or "load error" per request."""
    pull = mode == "get"
    prefill = half(mode, [] if pull else faults, client)
    decode = half(mode, faults if pull else [], client)
    problems = []
    try:
        src = {f"layer{i}": torch.randn(16, 2, 4, 8, generator=torch.Generator().manual_seed(seed + i)) for i in range(2)}
        dst = {name: torch.zeros_like(t) for name, t in src.items()}
        for name, cache in src.items():
            prefill.record_layer(name, cache)
        for i, fault in enumerate(faults):
            src_ids = [2 * i, 2 * i + 1]
            dst_ids = [15 - 2 * i, 14 - 2 * i]
            prefill.save([SaveEntry(f"r{i}", f"k{i}", src_ids, decode.config.address)])
            decode.load([LoadEntry(f"r{i}", f"k{i}", dst_ids, prefill.config.address)], dst)
            errors = decode.take_load_errors()
            arrived = all(torch.equal(dst[n][d], src[n][s]) for n in src for s, d in zip(src_ids, dst_ids))
            untouched = all(not dst[n][d].any() for n in src for d in dst_ids)
            if errors and not (errors == set(dst_ids) and untouched):
                problems.append(f"request {i} ({fault.value}): load errors {errors}, blocks written anyway")
            if not errors and not arrived:
                problems.append(f"request {i} ({fault.value}): no load error, but the blocks differ")
            if fault in (Fault.NONE, Fault.DELAY) and not arrived:
                problems.append(f"request {i} ({fault.value}): a request with no fault failed")
            if ended is not None:
                ended.append("load error" if errors else "arrived")
    finally:
        prefill.close()
        decode.close()
    return problems


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["get", "put", "put_async"]),
       faults=st.lists(st.sampled_from(list(Fault)), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_wire_faults_end_each_request_exact_or_as_a_clean_load_error(mode, faults, seed):
    problems = run(mode, faults, seed)
    schedule = ", ".join(f"Fault({f.value!r})" for f in faults)
    assert not problems, "\n".join(problems) + f"\nreplay: run({mode!r}, [{schedule}], {seed})"


@pytest.mark.parametrize("fault", [Fault.TRUNCATE, Fault.FAIL, Fault.DROP, Fault.CORRUPT])
@pytest.mark.parametrize("mode", ["get", "put"])
def test_each_damaging_fault_ends_its_request_as_a_load_error_and_the_next_arrives(mode, fault):
    ended = []
    problems = run(mode, [fault, Fault.NONE], seed=3, ended=ended)
    assert not problems and ended == ["load error", "arrived"], (problems, ended)


def test_a_client_that_skips_the_checksum_is_caught_writing_corrupted_blocks():
    """Negative control: the same tier, with pulls that trust their bytes, must report the damage."""
    problems = run("get", [Fault.NONE, Fault.CORRUPT, Fault.NONE], seed=7, client=UncheckedClient)
    assert problems == ["request 1 (corrupt): no load error, but the blocks differ"], problems
