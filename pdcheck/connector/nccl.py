"""The NCCL plane: KV blocks GPU to GPU through NCCL, bound with ctypes (no torch.distributed).

An `NcclPeer` is a 2-rank communicator between a prefill and a decode worker: rank 0 makes the
128-byte id (`nccl_lib.make_unique_id`) and sends it over the control plane; both build a peer with it.
- A request moves in one grouped NCCL call: all its per-layer tensors [n, *block] between one
  ncclGroupStart/End, then (with verify) one int64 message of per-block checksums.
- Sends and receives on a peer match in posting order: both sides post the same requests in the
  same order, with the same shapes, dtypes and verify flag.
- Streams: a send runs on the peer's send stream after the caller's event (recorded on the
  compute stream after the KV write). Receive buffers are allocated and written on the receive
  stream, and `Transfer.wait` hands them to the caller's current stream. No wait makes the host
  wait for the caller's stream (an engine's, which may still be busy with its step).
- Every wait has a deadline. Init, enqueue and `Transfer.wait` raise TimeoutError when it passes,
  after aborting the communicator (the peer is unusable afterwards).
- Checksums: per block, the sum (mod 2**64) of its 64-bit words (32-bit words or bytes where
  blocks are not whole words), made on the sender's GPU beside the data send unless the caller
  made them at save time. The receiver recomputes them on its checksum stream once the data is
  in (one kernel for the whole request, while the receive stream goes on with the next one);
  `wait` raises ChecksumError naming the first mismatching layer and block.
- A received request is one allocation; its layers are views into it.
- A peer belongs to one thread; its owner closes it, which aborts whatever is still in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import time
from dataclasses import dataclass

import torch

from pdcheck.connector.nccl_lib import (
    IN_PROGRESS, NCCL_DTYPES, SUCCESS, NcclError, UniqueId, library, nonblocking_config,
)
from pdcheck.connector.protocol import ProtocolError

POLL_S = 0.00005
ALIGN = 256  # bytes between the layers of a received request


class ChecksumError(ProtocolError):
    """A received block's content differs from what the sender checksummed."""

def nccl_args(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(pointer, count, ncclDataType_t); dtypes NCCL does not name travel as bytes."""
    code = NCCL_DTYPES.get(tensor.dtype)
    if code is None:
        return tensor.data_ptr(), tensor.numel() * tensor.element_size(), NCCL_DTYPES[torch.uint8]
    return tensor.data_ptr(), tensor.numel(), code


def layer_checksums(blocks: torch.Tensor) -> torch.Tensor:
    """One int64 per block of `blocks` [n, *block]: the wrapping sum of its 64-bit words (32-bit
    words or bytes where a block's size is not a multiple of 8 or 4 bytes)."""
    n, size = blocks.shape[0], blocks.element_size()
    block_bytes = blocks.numel() // n * size if n else 0
    if block_bytes == 0:
        return torch.zeros(n, dtype=torch.int64, device=blocks.device)
    word = next(w for w in (torch.int64, torch.int32, torch.uint8) if block_bytes % w.itemsize == 0)
    viewable = (blocks.shape[-1] * size) % word.itemsize == (blocks.storage_offset() * size) % word.itemsize == 0
    if blocks.dim() > 1 and viewable:
        return blocks.view(word).sum(dim=tuple(range(1, blocks.dim())), dtype=torch.int64)  # 2 ops, not 5
    return blocks.reshape(n, -1).view(torch.uint8).view(word).sum(dim=1, dtype=torch.int64)


def block_checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Checksums of every block of every layer, layer after layer, on the current stream: in one
    kernel when the layers lie back to back in one allocation (a staging or request buffer)."""
    fused = fused_view(tensors)
    return layer_checksums(fused) if fused is not None else torch.cat([layer_checksums(t) for t in tensors])


def fused_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """All layers as one [sum of n, *block] tensor, if they are adjacent slices of one storage."""
    first = tensors[0]
    block, pointer = first.shape[1:], first.data_ptr()
    for t in tensors:
        if t.shape[1:] != block or t.dtype != first.dtype or t.data_ptr() != pointer or not t.is_contiguous():
            return None
        pointer += t.numel() * t.element_size()
    if first.untyped_storage().data_ptr() + first.untyped_storage().nbytes() < pointer:
        return None
    shape = (sum(t.shape[0] for t in tensors), *block)
    strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return first.as_strided(shape, strides, first.storage_offset())


def request_buffer(specs: list[LayerSpec], device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One allocation on the current stream for a whole request, and its layers' views into it."""
    if specs and all(s == specs[0] for s in specs):  # the usual case, in two ops
        stacked = torch.empty((len(specs), *specs[0].shape), dtype=specs[0].dtype, device=device)
        return stacked, list(stacked.unbind(0))
    sizes = [math.prod(s.shape) * s.dtype.itemsize for s in specs]
    offsets = list(itertools.accumulate((-(-n // ALIGN) * ALIGN for n in sizes), initial=0))
    flat = torch.empty(offsets[-1], dtype=torch.uint8, device=device)
    return flat, [flat[o:o + n].view(s.dtype).view(s.shape) for o, n, s in zip(offsets, sizes, specs)]


@dataclass(frozen=True)
class LayerSpec:
    """What a receiver allocates for one layer: shape [n, *block] and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> LayerSpec:
        return cls(tuple(tensor.shape), tensor.dtype)


@dataclass(frozen=True)
class ChecksumCheck:
    sent: torch.Tensor
    made: torch.Tensor
    blocks_per_layer: tuple[int, ...]
    block_ids: tuple[int, ...] | None

    def raise_if_bad(self) -> None:
        if torch.equal(self.sent, self.made):
            return
        bad = torch.ne(self.sent, self.made).nonzero()
        index = block = int(bad[0, 0])
        layer = 0
        while block >= self.blocks_per_layer[layer]:
            block, layer = block - self.blocks_per_layer[layer], layer + 1
        name = f"block {block}" + (f" (id {self.block_ids[block]})" if self.block_ids else "")
        raise ChecksumError(f"layer {layer} {name}: checksum mismatch, sent {int(self.sent[index])}, "
                            f"received {int(self.made[index])} ({bad.shape[0]} block(s) differ)")


@dataclass(frozen=True)
class Transfer:
    """One request in flight on a peer; `wait` is the only way to its tensors."""

    peer: NcclPeer
    tensors: list[torch.Tensor]
    done: torch.cuda.Event
    base: torch.Tensor | None = None  # a received request's one allocation
    check: ChecksumCheck | None = None

    def wait(self, deadline_s: float) -> list[torch.Tensor]:
        self.peer.await_event(self.done, time.monotonic() + deadline_s)
        if self.check is not None:
            with torch.cuda.stream(self.peer.sum_stream):  # not the caller's: its stream may be busy for long
                self.check.raise_if_bad()
        if self.base is not None:
            stream = torch.cuda.current_stream(self.peer.device)
            stream.wait_event(self.done)
            self.base.record_stream(stream)
        return self.tensors


class NcclPeer:
    """A 2-rank NCCL communicator with its send, receive and checksum streams."""

    def __init__(self, unique_id: bytes, rank: int, device, deadline_s: float = 60.0):
        if rank not in (0, 1) or len(unique_id) != 128:
            raise ValueError(f"rank must be 0 or 1 and the id 128 bytes: rank={rank}, id of {len(unique_id)}")
        self.lib, self.rank, self.other = library(), rank, 1 - rank
        self.device, self.deadline_s, self.comm = cuda_device(device), deadline_s, None
        with torch.cuda.device(self.device):
            self.send_stream, self.recv_stream, self.sum_stream = (torch.cuda.Stream() for _ in range(3))
            try:
                self.connect(unique_id, time.monotonic() + deadline_s)
            except BaseException:
                self.close()
                raise

    def connect(self, unique_id: bytes, deadline_at: float) -> None:
        comm = ctypes.c_void_p()
        uid = UniqueId.from_buffer_copy(unique_id)
        config = nonblocking_config()
        self.lib.call("ncclCommInitRankConfig", ctypes.byref(comm), 2, uid, self.rank, ctypes.byref(config))
        self.comm = comm
        self.settle(deadline_at)
        with torch.cuda.stream(self.send_stream):  # one word each way: connections made now, not mid-request
            out, back = (torch.zeros(1, dtype=torch.int32, device=self.device) for _ in range(2))
        with self.group(deadline_at):
            self.post("ncclSend", [out], self.send_stream)
            self.post("ncclRecv", [back], self.send_stream)
        self.await_event(recorded(self.send_stream), deadline_at)

    def send_blocks(self, tensors: list[torch.Tensor], after: torch.cuda.Event, *,
                    checksums: torch.Tensor | None = None, verify: bool = True) -> Transfer:
        """Send one request's layers once `after` has passed; `checksums`, if given, were made at
        save time and are ready at `after`."""
        check_tensors(tensors, self.device)
        deadline_at = time.monotonic() + self.deadline_s
        self.order_send_after(after)
        with self.group(deadline_at):
            for t in tensors:
                t.record_stream(self.send_stream)
            self.post("ncclSend", tensors, self.send_stream)
        if verify:
            sums = self.checksums_beside(tensors, after) if checksums is None else checked_sums(checksums, tensors)
            sums.record_stream(self.send_stream)
            with self.group(deadline_at):
                self.post("ncclSend", [sums], self.send_stream)
        return Transfer(self, list(tensors), recorded(self.send_stream))

    def order_send_after(self, after: torch.cuda.Event) -> None:
        """The send stream waits for the compute stream's event recorded after the KV write."""
        self.send_stream.wait_event(after)

    def checksums_beside(self, tensors: list[torch.Tensor], after: torch.cuda.Event) -> torch.Tensor:
        """Checksums made on the checksum stream while the data goes; the send stream waits for them."""
        self.sum_stream.wait_event(after)
        with torch.cuda.stream(self.sum_stream):
            sums = block_checksums(tensors)
        self.send_stream.wait_event(recorded(self.sum_stream))  # so the send stream's record covers these reads
        return sums

    def recv_blocks(self, specs: list[LayerSpec], *, verify: bool = True, block_ids=None) -> Transfer:
        """Post the receive of one request; `block_ids` only name blocks in a ChecksumError."""
        deadline_at = time.monotonic() + self.deadline_s
        base, tensors = self.receive_buffer(specs)
        with self.group(deadline_at):
            self.post("ncclRecv", tensors, self.recv_stream)
        if not verify:
            return Transfer(self, tensors, recorded(self.recv_stream), base)
        check = self.post_check(base, tensors, deadline_at, block_ids)
        return Transfer(self, tensors, recorded(self.sum_stream), base, check)

    def receive_buffer(self, specs: list[LayerSpec]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A request's receive allocation, made on the receive stream that writes it."""
        with torch.cuda.stream(self.recv_stream):
            return request_buffer(specs, self.device)

    def post_check(self, base, tensors: list[torch.Tensor], deadline_at: float, block_ids) -> ChecksumCheck:
        """Receive the sender's checksums, then recompute them on the checksum stream, so the
        receive stream can go on with the next request meanwhile."""
        counts = tuple(t.shape[0] for t in tensors)
        with torch.cuda.stream(self.recv_stream):
            sent = torch.empty(sum(counts), dtype=torch.int64, device=self.device)
        with self.group(deadline_at):
            self.post("ncclRecv", [sent], self.recv_stream)
        self.sum_stream.wait_event(recorded(self.recv_stream))
        base.record_stream(self.sum_stream)
        with torch.cuda.stream(self.sum_stream):
            made = block_checksums(tensors)
        return ChecksumCheck(sent, made, counts, tuple(block_ids) if block_ids is not None else None)

    def post_group(self, name: str, tensors: list[torch.Tensor], stream: torch.cuda.Stream) -> None:
        """Plain ncclSend or ncclRecv of `tensors` in one group on `stream`, ordered by the caller
        (the bench's baselines)."""
        with self.group(time.monotonic() + self.deadline_s):
            self.post(name, tensors, stream)

    @contextlib.contextmanager
    def group(self, deadline_at: float):
        self.lib.call("ncclGroupStart")
        try:
            yield
        finally:
            self.lib.call("ncclGroupEnd", comm=self.comm)
        self.settle(deadline_at)

    def post(self, name: str, tensors: list[torch.Tensor], stream: torch.cuda.Stream) -> None:
        """ncclSend or ncclRecv of each tensor, with the rank, communicator and stream looked up once."""
        function, comm, handle = getattr(self.lib.cdll, name), self.live_comm(), stream.cuda_stream
        for t in tensors:
            pointer, count, dtype = nccl_args(t)
            self.lib.check(name, function(pointer, count, dtype, self.other, comm, handle), comm)

    def settle(self, deadline_at: float) -> None:
        """Until NCCL has taken the last call (a non-blocking communicator may finish it in the background)."""
        self.poll(lambda: self.async_state() == SUCCESS, deadline_at, "NCCL call")

    def await_event(self, event: torch.cuda.Event, deadline_at: float) -> None:
        self.poll(lambda: self.async_state() == SUCCESS and event.query(), deadline_at, "NCCL transfer")

    def poll(self, is_done, deadline_at: float, what: str) -> None:
        while not is_done():
            if time.monotonic() > deadline_at:
                self.close()
                raise TimeoutError(f"{what} with rank {self.other} not done by its deadline; communicator aborted")
            time.sleep(POLL_S)

    def async_state(self) -> int:
        state = ctypes.c_int()
        self.lib.call("ncclCommGetAsyncError", self.live_comm(), ctypes.byref(state), comm=self.comm)
        if state.value not in (SUCCESS, IN_PROGRESS):
            reason = self.lib.describe(state.value, self.comm)
            raise NcclError(f"communicator with rank {self.other} failed: {reason}")
        return state.value

    def live_comm(self) -> ctypes.c_void_p:
        if self.comm is None:
            raise NcclError(f"communicator with rank {self.other} is closed")
        return self.comm

    def close(self) -> None:
        """Abort the communicator (idempotent): call it once every transfer has been waited."""
        comm, self.comm = self.comm, None
        if comm is not None:
            self.lib.call("ncclCommAbort", comm)


def recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


def check_tensors(tensors: list[torch.Tensor], device: torch.device) -> None:
    for i, t in enumerate(tensors):
        if t.device != device or not t.is_contiguous() or t.dim() == 0:
            raise ValueError(f"layer {i}: need a contiguous [n, *block] tensor on {device}: {t.shape}, {t.device}")


def checked_sums(checksums: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    count = sum(t.shape[0] for t in tensors)
    if checksums.dtype != torch.int64 or tuple(checksums.shape) != (count,) or checksums.device != tensors[0].device:
        raise ValueError(f"checksums must be int64 [{count}] on {tensors[0].device}, got "
                         f"{checksums.dtype} {tuple(checksums.shape)} on {checksums.device}")
    return checksums


def cuda_device(device) -> torch.device:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"an NCCL peer needs a CUDA device, got {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
