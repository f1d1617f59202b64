"""The reference connector's worker halves on the NCCL plane, GPU to GPU, through the code path the
vLLM plugin drives: a prefill WorkerHalf on GPU 0 and a decode WorkerHalf on GPU 1 (both on GPU 0,
over NCCL's socket transport, on a machine of one GPU), each in its own spawned process
(`run_halves` owns them), move requests in every mode. As in a vLLM worker: the settings come from
kv_connector_extra_config's JSON (`{"plane": "nccl", ...}` through P2PConfig.from_extra); each
half runs on a stream of its own set as current (vLLM's engine does that on CUDA), prefill records
its layers (save_kv_layer) and saves at the end of the step (wait_for_save), decode loads into a
name -> layer dict (start_load_kv); the caches are vLLM 0.32's per-layer [blocks, heads,
block_size, K|V] views of one allocation in three of its physical orders (LBNHC, its default;
LHBNC; BHLNC, blocks outermost across layers), and the backend-native layouts of older vLLMs:
- several requests saved in one step (in flight together, then loaded in the reverse order), the
  same content under several keys, a prefix hit (first_block > 0), prefill's KV written behind a
  stall of its stream and its cache blocks overwritten as soon as they are saved, decode's stream
  stalled before the load: each request arrives bitwise exact (decode rebuilds what prefill held
  from the seeds), no other block changes, the transfer log shows every save and load, and a GET
  save returns without waiting for the stalled stream (the send waits for it on the GPU);
- a byte flipped after the checksums were made (a variant of prefill's plane) ends that request,
  and only it, as a load error naming exactly its blocks; the next request arrives on a new peer;
- a prefill killed as it is about to send ends decode's load as a load error within the deadline
  (in GET, decode's receive is posted by then, so the NCCL communicator is what fails).
The CPU tests check the `plane` setting, and that each plane refuses what it cannot move.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
zmq = pytest.importorskip("zmq")

from pdcheck.cluster.instance import free_port  # noqa: E402
from pdcheck.connector.config import Mode, P2PConfig, Plane  # noqa: E402
from pdcheck.connector.layouts import KVLayout, extract  # noqa: E402
from pdcheck.connector.nccl import recorded  # noqa: E402
from pdcheck.connector.nccl_plane import NcclPlane  # noqa: E402
from pdcheck.connector.protocol import Hello, ProtocolError, encode  # noqa: E402
from pdcheck.connector.stats import read_transfers  # noqa: E402
from pdcheck.connector.tcp import KVClient  # noqa: E402
from pdcheck.connector.worker import LoadEntry, SaveEntry, WorkerHalf  # noqa: E402
from pdcheck.testing.gpu import Rank, run_ranks  # noqa: E402

DEADLINE_S, KILL_DEADLINE_S, KILL_AFTER_S = 30.0, 6.0, 0.5  # 30 s: time enough under compute-sanitizer too
STALL_S, CYCLES_PER_S = 0.25, 2_000_000_000  # H100/H200 SMs clock at most ~1.98 GHz: a stall lasts at least STALL_S
BARRIER_S, PAIR_TIMEOUT_S = 60.0, 240.0
LAYERS, BLOCKS, BLOCK_SIZE = 3, 12, 16
BAD = "bad"  # requests named so are the ones a variant breaks
DTYPES = {KVLayout.FLASH_ATTN: torch.bfloat16, KVLayout.FLASH_INFER: torch.float16,
          KVLayout.MLA: torch.bfloat16, KVLayout.BLOCKS_FIRST: torch.float32}
# vLLM 0.32's KVCacheLayout stride orders over the logical [layers, blocks, heads, block_size, C]
VLLM_ORDERS = {"LBNHC": (0, 1, 3, 2, 4), "LHBNC": (0, 2, 1, 3, 4), "BHLNC": (1, 2, 0, 3, 4)}


@dataclass(frozen=True)
class Form:
    """A worker's paged caches: the connector's `layout` setting and, for vLLM 0.32, the physical
    order (a KVCacheLayout name) of the one allocation its per-layer blocks-first views share."""

    layout: KVLayout
    vllm_order: str | None = None  # None: one tensor per layer in `layout`'s own shape

    @property
    def name(self) -> str:
        return f"vllm-{self.vllm_order}" if self.vllm_order else self.layout.value


VLLM_FORMS = tuple(Form(KVLayout.BLOCKS_FIRST, order) for order in VLLM_ORDERS)
NATIVE_FORMS = tuple(Form(layout) for layout in KVLayout)


@dataclass(frozen=True)
class Request:
    """Prefill's blocks `src_ids` go to decode's `dst_ids`, from src_ids[first_block] on."""

    name: str
    src_ids: tuple[int, ...]
    dst_ids: tuple[int, ...]
    first_block: int = 0

    @property
    def is_bad(self) -> bool:
        return self.name.startswith(BAD)


@dataclass(frozen=True)
class Step:
    """Requests saved in one call while prefill's caches hold content `seed`."""

    seed: int
    requests: tuple[Request, ...]


EXACT = (
    Step(1, (Request("a", (1, 4, 7), (0, 2, 9)), Request("b", (2, 3), (5, 11)),
             Request("a-twin", (1, 4, 7), (3, 6, 8)))),
    Step(1, (Request("a-again", (1, 4, 7), (1, 4, 10)),)),
    Step(2, (Request("prefix-hit", (0, 5, 6, 10), (7, 11), first_block=2), Request("b-new", (2, 3), (5, 0)))),
)
CORRUPT = (
    Step(1, (Request("before", (0, 1), (0, 1)),)),
    Step(2, (Request("bad", (2, 3, 4), (2, 3, 4)), Request("beside", (5,), (5,)))),
    Step(3, (Request("after", (6, 7), (6, 7)),)),
)
KILL = (
    Step(1, (Request("before", (0, 1), (0, 1)),)),
    Step(2, (Request("bad", (2, 3), (2, 3)),)),
)


@dataclass(frozen=True)
class Run:
    """One pair of processes: for each form, a prefill and a decode half go through `plan`."""

    mode: Mode
    variant: str  # prefill's plane: a key of VARIANTS
    forms: tuple[Form, ...]
    plan: tuple[Step, ...]
    ports: tuple[int, ...]  # per form: prefill's, then decode's
    stats_dir: str
    deadline_s: float = DEADLINE_S

    def address(self, rank: int, index: int) -> str:
        return f"127.0.0.1:{self.ports[2 * index + rank]}"

    def config(self, rank: int, index: int) -> P2PConfig:
        """As the plugin makes it: from kv_connector_extra_config, JSON values."""
        stats = Path(self.stats_dir) / f"{('prefill', 'decode')[rank]}-{self.forms[index].name}.jsonl"
        return P2PConfig.from_extra({"port": self.ports[2 * index + rank], "mode": self.mode.value, "plane": "nccl",
                                     "layout": self.forms[index].layout.value, "deadline_s": self.deadline_s,
                                     "stats_path": str(stats)})

    def key(self, form: Form, request: Request) -> str:
        return f"{form.name}/{request.name}"


class CorruptingPlane(NcclPlane):
    """Flips one byte of a bad request's KV after its checksums were made (a write racing the send)."""

    def send(self, peer, frame, deadline_s):
        if frame.header.transfer_key.rpartition("/")[2].startswith(BAD):
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(frame.after)
            flat = frame.data.view(-1).view(torch.uint8)
            flat[flat.numel() // 2] ^= 0x10
            frame = dataclasses.replace(frame, after=recorded(stream))
        super().send(peer, frame, deadline_s)


class KillingPlane(NcclPlane):
    """Prefill's process dies as it is about to send a bad request, a moment after decode
    accepted it (PUT) or got its header (GET): decode's receive is posted by then."""

    def send(self, peer, frame, deadline_s):
        if frame.header.transfer_key.rpartition("/")[2].startswith(BAD):
            time.sleep(KILL_AFTER_S)
            os.kill(os.getpid(), signal.SIGKILL)
        super().send(peer, frame, deadline_s)


VARIANTS = {"reference": NcclPlane, "corrupt": CorruptingPlane, "kill": KillingPlane}


class VariantHalf(WorkerHalf):
    def __init__(self, config: P2PConfig, plane_class):
        self.plane_class = plane_class
        super().__init__(config)

    def make_plane(self, client_factory):
        return self.plane_class(self.config, client_factory)


def cache_shape(layout: KVLayout) -> tuple[int, ...]:
    return {KVLayout.FLASH_ATTN: (2, BLOCKS, BLOCK_SIZE, 2, 64), KVLayout.FLASH_INFER: (BLOCKS, 2, BLOCK_SIZE, 2, 64),
            KVLayout.MLA: (BLOCKS, BLOCK_SIZE, 96), KVLayout.BLOCKS_FIRST: (BLOCKS, 2, BLOCK_SIZE, 64)}[layout]


def content(form: Form, seed: int, device) -> list[torch.Tensor]:
    """LAYERS caches made from `seed` on the CPU, so every process can rebuild them. A vLLM form's
    are bf16 [blocks, 2 heads, block_size, K|V of 64 each] views of one allocation in its order."""
    gen = torch.Generator().manual_seed(seed)
    if form.vllm_order is None:
        return [torch.randn(cache_shape(form.layout), generator=gen).to(DTYPES[form.layout]).to(device)
                for _ in range(LAYERS)]
    order, logical = VLLM_ORDERS[form.vllm_order], (LAYERS, BLOCKS, 2, BLOCK_SIZE, 128)
    physical = torch.randn([logical[d] for d in order], generator=gen).to(torch.bfloat16).to(device)
    return list(physical.permute([order.index(d) for d in range(5)]).unbind(0))


def stall(seconds: float) -> None:
    """Keep this half's stream busy for `seconds` from now (the engine's step still running)."""
    torch.cuda._sleep(int(seconds * CYCLES_PER_S))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def this_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


# -- the two sides, each in its own process ---------------------------------------------------
def prefill(half: WorkerHalf, run: Run, index: int, barrier) -> tuple[list[str], list[float]]:
    """Each step: the KV written behind a stall, the layers recorded (save_kv_layer), then saved
    (wait_for_save). Returns failure lines and the seconds each GET save took."""
    form, device, seconds = run.forms[index], this_device(), []
    caches = content(form, 0, device)
    for step in run.plan:
        written = content(form, step.seed, device)  # made before the stall: a copy from the host would wait for it
        stall(STALL_S)
        for i, (cache, new) in enumerate(zip(caches, written)):
            cache.copy_(new)
            half.record_layer(f"layer{i}", cache)
        entries = [SaveEntry(r.name, run.key(form, r), list(r.src_ids), run.address(1, index)) for r in step.requests]
        if run.mode is Mode.GET:  # decode pulls only what was saved; a push is taken when it comes
            started = time.monotonic()
            half.save(entries)
            seconds.append(time.monotonic() - started)
            barrier.wait(BARRIER_S)
        else:
            barrier.wait(BARRIER_S)
            half.save(entries)
        for cache in caches:
            cache.fill_(-1)  # the blocks reused at once: a send that read them late would carry this
    barrier.wait(BARRIER_S)
    return finished_lines(half, {r.name for step in run.plan for r in step.requests}), seconds


def finished_lines(half: WorkerHalf, ids: set[str]) -> list[str]:
    done, deadline_at = set(), time.monotonic() + DEADLINE_S
    while done != ids and time.monotonic() < deadline_at:
        done |= half.finished(ids)
        time.sleep(0.05)
    return [] if done == ids else [f"prefill reported {sorted(done)} done sending, expected {sorted(ids)}"]


def decode(half: WorkerHalf, run: Run, index: int, barrier) -> tuple[list[str], list[float]]:
    """Each step: the requests loaded (start_load_kv) while this half's stream is still stalled,
    then checked on that stream. Returns failure lines and the seconds each load took."""
    form, device = run.forms[index], this_device()
    caches = content(form, 99, device)
    before = [c.clone() for c in caches]
    lines, seconds, written = [], [], set()
    for step in run.plan:
        barrier.wait(BARRIER_S)
        entries = [LoadEntry(r.name, run.key(form, r), list(r.dst_ids), run.address(0, index), r.first_block)
                   for r in reversed(step.requests)]
        stall(STALL_S)
        started = time.monotonic()
        half.load(entries, {f"layer{i}": c for i, c in enumerate(caches)})
        seconds.append(time.monotonic() - started)
        lines += step_lines(form, step, caches, before, half.take_load_errors())
        written |= {b for r in step.requests if not r.is_bad for b in r.dst_ids}
    if run.variant != "kill":
        barrier.wait(BARRIER_S)
    return lines + untouched_lines(form, caches, before, written), seconds


def step_lines(form: Form, step: Step, caches, before, errors: set[int]) -> list[str]:
    """Good requests hold what prefill saved; bad ones are load errors naming exactly their blocks."""
    bad_ids = {b for r in step.requests if r.is_bad for b in r.dst_ids}
    lines = [] if errors == bad_ids else [f"step {step}: load errors on {sorted(errors)}, expected {sorted(bad_ids)}"]
    saved, layout = content(form, step.seed, caches[0].device), form.layout
    for r in step.requests:
        src = r.src_ids[r.first_block:r.first_block + len(r.dst_ids)]
        for layer, (cache, old, new) in enumerate(zip(caches, before, saved)):
            want = extract(old, layout, r.dst_ids) if r.is_bad else extract(new, layout, src)
            if not torch.equal(bits(extract(cache, layout, r.dst_ids)), bits(want)):
                lines.append(f"{form.name}/{r.name}: layer {layer}: blocks {r.dst_ids} hold the wrong bytes")
    return lines


def untouched_lines(form: Form, caches, before, written: set[int]) -> list[str]:
    others = [b for b in range(BLOCKS) if b not in written]
    return [f"{form.name}: layer {i}: a block outside {sorted(written)} changed"
            for i, (cache, old) in enumerate(zip(caches, before))
            if not torch.equal(bits(extract(cache, form.layout, others)), bits(extract(old, form.layout, others)))]


def side(rank: int, run: Run, index: int, barrier) -> tuple[list[str], list[float]]:
    config = run.config(rank, index)
    half = VariantHalf(config, VARIANTS[run.variant]) if rank == 0 else WorkerHalf(config)
    try:
        return (prefill if rank == 0 else decode)(half, run, index, barrier)
    finally:
        half.close()


def half_main(rank: Rank, run: Run) -> list[tuple[list[str], list[float]]]:
    torch.cuda.set_stream(torch.cuda.Stream())  # the engine's own stream, current on its thread, as in vLLM
    return [side(rank.index, run, i, rank.barrier) for i in range(len(run.forms))]


# -- the parent ---------------------------------------------------------------------------------
def run_halves(run: Run, ranks: tuple[int, ...] = (0, 1)) -> dict[int, list]:
    """Prefill (rank 0) and decode (rank 1) in spawned processes (`run_ranks` places and owns
    them); the results of `ranks`."""
    return run_ranks(half_main, (run,), 2, PAIR_TIMEOUT_S, "pdcheck-nccl-plane", wait_for=ranks)


def make_run(mode: Mode, variant: str, forms, plan, tmp_path: Path, deadline_s: float = DEADLINE_S) -> Run:
    ports = tuple(free_port() for _ in range(2 * len(forms)))
    return Run(mode, variant, tuple(forms), plan, ports, str(tmp_path), deadline_s)


def log_lines(run: Run, reason: str = "") -> list[str]:
    """Every request saved once; good ones loaded with no error, bad ones failed (for `reason`)."""
    transfers, lines = read_transfers(sorted(Path(run.stats_dir).glob("*.jsonl"))), []
    for form in run.forms:
        for r in (r for step in run.plan for r in step.requests):
            got, loaded = transfers.get(run.key(form, r)), 0 if r.is_bad else len(r.dst_ids)
            want = (len(r.src_ids), loaded, r.is_bad)
            if got is None or (got.saved_blocks, got.loaded_blocks, bool(got.errors)) != want:
                lines.append(f"{run.key(form, r)}: transfer log {got}, expected {len(r.src_ids)} blocks saved, "
                             f"{loaded} loaded, {'an' if r.is_bad else 'no'} error")
            elif r.is_bad and not all(reason in e for e in got.errors):
                lines.append(f"{run.key(form, r)}: load error {got.errors} does not say {reason!r}")
    return lines


def reproducer(request, run: Run) -> str:
    return (f"reproduce: pytest '{request.node.nodeid}' -p pdcheck.plugin  # mode={run.mode.value} "
            f"variant={run.variant} forms={[form.name for form in run.forms]} deadline_s={run.deadline_s}")


def side_lines(outcomes: dict[int, list]) -> list[str]:
    return [line for results in outcomes.values() for lines, _ in results for line in lines]


# -- GPU tier -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("forms", ["vllm", "native"])
@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_requests_arrive_bitwise_exact_in_vllm_and_native_layouts_and_the_log_shows_each_transfer(
        request, tmp_path, mode, forms):
    run = make_run(mode, "reference", VLLM_FORMS if forms == "vllm" else NATIVE_FORMS, EXACT, tmp_path)
    outcomes = run_halves(run)
    lines = side_lines(outcomes) + log_lines(run) + save_lines(run, outcomes[0])
    load_s = {form.name: f"{max(seconds):.3f}" for form, (_, seconds) in zip(run.forms, outcomes[1])}
    request.node.user_properties.append(("slowest_load_s", f"{mode.value}: {load_s}"))
    assert not lines, "\n".join([*lines, reproducer(request, run)])


def save_lines(run: Run, prefill_results: list) -> list[str]:
    """A GET save returns while prefill's stream is still stalled: the host does not wait for it
    (the first steps load CUDA kernels, which can wait for an idle GPU: the last step counts)."""
    return [f"{form.name}: the last GET save took {seconds[-1]:.3f}s behind a {STALL_S}s stall of the stream"
            for form, (_, seconds) in zip(run.forms, prefill_results) if seconds and seconds[-1] > STALL_S / 2]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_a_byte_flipped_after_the_checksum_is_a_load_error_naming_only_its_blocks(request, tmp_path, mode):
    run = make_run(mode, "corrupt", VLLM_FORMS[:1], CORRUPT, tmp_path)
    lines = side_lines(run_halves(run)) + log_lines(run, reason="checksum mismatch")
    assert not lines, "\n".join([*lines, reproducer(request, run)])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_a_prefill_killed_mid_transfer_ends_the_load_as_a_load_error_within_the_deadline(request, tmp_path, mode):
    run = make_run(mode, "kill", [Form(KVLayout.FLASH_ATTN)], KILL, tmp_path, deadline_s=KILL_DEADLINE_S)
    outcomes = run_halves(run, ranks=(1,))
    [(_, seconds)] = outcomes[1]
    lines = side_lines(outcomes) + log_lines(run, reason="communicator" if mode is Mode.GET else "")
    killed = read_transfers(sorted(tmp_path.glob("*.jsonl"))).get(run.key(run.forms[0], KILL[-1].requests[0]))
    request.node.user_properties.append(("load_after_kill", f"{mode.value}: {seconds[-1]:.2f}s: {killed}"))
    if seconds[-1] > run.deadline_s + 3:
        lines.append(f"the load after the kill took {seconds[-1]:.1f}s for a {run.deadline_s}s deadline")
    assert not lines, "\n".join([*lines, reproducer(request, run)])


# -- CPU tier -----------------------------------------------------------------------------------
def test_plane_setting_takes_tcp_or_nccl_and_refuses_anything_else():
    assert P2PConfig(port=1).plane is Plane.TCP
    assert P2PConfig.from_extra({"port": 1, "plane": "nccl"}).plane is Plane.NCCL
    with pytest.raises(ValueError, match="plane 'rdma': not a valid value"):
        P2PConfig.from_extra({"port": 1, "plane": "rdma"})
    with pytest.raises(ValueError, match="plane 'nccl': expected one of"):
        P2PConfig(port=1, plane="nccl")


def test_nccl_plane_refuses_kv_caches_that_are_not_on_cuda():
    config = P2PConfig(port=free_port(), plane=Plane.NCCL)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA KV caches"):
            WorkerHalf(config)
        return
    half = WorkerHalf(config)
    try:
        half.record_layer("layer0", torch.zeros(4, 2, 16, 8))
        with pytest.raises(ValueError, match="needs CUDA KV caches"):
            half.save([SaveEntry("r", "k", [0])])
    finally:
        half.close()


def test_a_tcp_half_refuses_a_handshake_that_offers_nccl():
    half, context = WorkerHalf(P2PConfig(port=free_port())), zmq.Context()
    client = KVClient(context)
    try:
        with pytest.raises(ProtocolError, match="offered NCCL: this peer's data plane is tcp"):
            client.request(half.config.address, [encode(Hello("decode", nccl_id=bytes(128)))], 5)
    finally:
        client.close()
        context.term()
        half.close()
