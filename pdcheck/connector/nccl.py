"""The NCCL plane: KV blocks GPU to GPU through NCCL, bound with ctypes (no torch.distributed).

An `NcclPeer` is a 2-rank communicator between a prefill and a decode worker: rank 0 makes the
128-byte id (`make_unique_id`) and sends it over the control plane; both build a peer with it.
- A request moves in one grouped NCCL call: all its per-layer tensors [n, *block] between one
  ncclGroupStart/End, then (with verify) one int64 message of per-block checksums.
- Sends and receives on a peer match in posting order: both sides post the same requests in the
  same order, with the same shapes, dtypes and verify flag.
- Streams: a send runs on the peer's send stream after the caller's event (recorded on the
  compute stream after the KV write). Receive buffers are allocated and written on the receive
  stream, and `Transfer.wait` hands them to the caller's current stream.
- Every wait has a deadline. Init, enqueue and `Transfer.wait` raise TimeoutError when it passes,
  after aborting the communicator (the peer is unusable afterwards).
- Checksums: per block, the sum of its 32-bit words (of its bytes where a block is not whole
  words), made on the sender's GPU beside the data send unless the caller made them at save
  time; the receiver recomputes them on its receive stream and `wait` raises ChecksumError
  naming the first mismatching layer and block.
- A peer belongs to one thread; its owner closes it, which aborts whatever is still in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pdcheck.connector.protocol import ProtocolError

LIB_NAME = "libnccl.so.2"
SUCCESS, IN_PROGRESS = 0, 7
POLL_S = 0.0002
NCCL_DTYPES = {torch.int8: 0, torch.uint8: 1, torch.bool: 1, torch.int32: 2, torch.int64: 4,
               torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9}


class NcclError(RuntimeError):
    """NCCL refused a call or failed a communicator."""


class ChecksumError(ProtocolError):
    """A received block's content differs from what the sender checksummed."""


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


class Config(ctypes.Structure):  # ncclConfig_t as of NCCL 2.14: later NCCLs read `size`, default the rest
    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
                ("blocking", ctypes.c_int), ("cgaClusterSize", ctypes.c_int), ("minCTAs", ctypes.c_int),
                ("maxCTAs", ctypes.c_int), ("netName", ctypes.c_char_p)]


def nonblocking_config() -> Config:
    undef = -(2**31)
    return Config(ctypes.sizeof(Config), 0xCAFEBEEF, 21400, 0, undef, undef, undef, None)


P, I, SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
PROTOTYPES = {
    "ncclGetUniqueId": (I, [ctypes.POINTER(UniqueId)]),
    "ncclCommInitRankConfig": (I, [ctypes.POINTER(P), I, UniqueId, I, ctypes.POINTER(Config)]),
    "ncclCommGetAsyncError": (I, [P, ctypes.POINTER(I)]),
    "ncclSend": (I, [P, SIZE, I, I, P, P]),
    "ncclRecv": (I, [P, SIZE, I, I, P, P]),
    "ncclGroupStart": (I, []),
    "ncclGroupEnd": (I, []),
    "ncclCommAbort": (I, [P]),
    "ncclGetErrorString": (ctypes.c_char_p, [I]),
    "ncclGetLastError": (ctypes.c_char_p, [P]),
}


def library_candidates() -> list[Path]:
    """Where libnccl.so.2 is looked for: the nvidia-nccl-cu12/-cu13 package, then beside torch."""
    places = []
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("nvidia.nccl")
        places += [Path(d) / "lib" for d in (spec.submodule_search_locations or [])] if spec else []
    roots = [Path(p) / "nvidia" for p in sys.path if p]
    places += [r / "nccl" / "lib" for r in roots] + [lib.parent for r in roots for lib in r.glob(f"*/lib/{LIB_NAME}")]
    torch_dir = Path(torch.__file__).parent
    places += [torch_dir / "lib", torch_dir.parent / "nvidia" / "nccl" / "lib"]
    return [p / LIB_NAME for p in dict.fromkeys(places)]


def find_library() -> str:
    explicit = os.environ.get("PDCHECK_NCCL_LIB")
    if explicit:
        if not Path(explicit).is_file():
            raise NcclError(f"PDCHECK_NCCL_LIB={explicit} is not a file")
        return explicit
    candidates = library_candidates()
    found = next((str(c) for c in candidates if c.is_file()), None) or ctypes.util.find_library("nccl")
    if found is None:
        looked = "\n  ".join(["$PDCHECK_NCCL_LIB (unset)", *map(str, candidates), "ctypes.util.find_library('nccl')"])
        raise NcclError(f"{LIB_NAME} not found; looked in:\n  {looked}")
    return found


class Library:
    """The NCCL functions this plane calls, with their return codes checked."""

    def __init__(self, path: str):
        self.path = path
        self.cdll = ctypes.CDLL(path)
        for name, (restype, argtypes) in PROTOTYPES.items():
            function = getattr(self.cdll, name)
            function.restype, function.argtypes = restype, argtypes

    def call(self, name: str, *args, comm=None) -> int:
        """Call `name`; NCCL's InProgress (non-blocking communicators) counts as accepted."""
        result = getattr(self.cdll, name)(*args)
        if result not in (SUCCESS, IN_PROGRESS):
            raise NcclError(f"{name} failed: {self.describe(result, comm)}")
        return result

    def describe(self, result: int, comm=None) -> str:
        text = self.cdll.ncclGetErrorString(result).decode()
        last = self.cdll.ncclGetLastError(comm).decode() if comm else ""
        return f"{text} ({result})" + (f": {last}" if last else "")


@functools.lru_cache(maxsize=1)
def library() -> Library:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # point-to-point needs no NVLink multicast
    return Library(find_library())


def make_unique_id() -> bytes:
    """A new communicator id, for rank 0 to send to rank 1. Its process hosts NCCL's bootstrap."""
    uid = UniqueId()
    library().call("ncclGetUniqueId", ctypes.byref(uid))
    return bytes(uid.internal)


def nccl_args(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(pointer, count, ncclDataType_t); dtypes NCCL does not name travel as bytes."""
    code = NCCL_DTYPES.get(tensor.dtype)
    if code is None:
        return tensor.data_ptr(), tensor.numel() * tensor.element_size(), NCCL_DTYPES[torch.uint8]
    return tensor.data_ptr(), tensor.numel(), code


def layer_checksums(blocks: torch.Tensor) -> torch.Tensor:
    """One int64 per block of `blocks` [n, *block]: the sum of its 32-bit words (or bytes)."""
    n = blocks.shape[0]
    if blocks.numel() == 0:
        return torch.zeros(n, dtype=torch.int64, device=blocks.device)
    rows = blocks.reshape(n, -1).view(torch.uint8)
    if rows.shape[1] % 4 == 0:
        rows = rows.view(torch.int32)
    return rows.sum(dim=1, dtype=torch.int64)


def block_checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Checksums of every block of every layer, layer after layer, on the current stream."""
    return torch.cat([layer_checksums(t) for t in tensors])


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
        bad = torch.ne(self.sent, self.made).nonzero()
        if bad.numel() == 0:
            return
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
    check: ChecksumCheck | None = None

    def wait(self, deadline_s: float) -> list[torch.Tensor]:
        self.peer.await_event(self.done, time.monotonic() + deadline_s)
        if self.check is not None:
            self.check.raise_if_bad()
        stream = torch.cuda.current_stream(self.peer.device)
        stream.wait_event(self.done)
        for t in self.tensors:
            t.record_stream(stream)
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
            self.post("ncclSend", out, self.send_stream)
            self.post("ncclRecv", back, self.send_stream)
        self.await_event(recorded(self.send_stream), deadline_at)

    def send_blocks(self, tensors: list[torch.Tensor], after: torch.cuda.Event, *,
                    checksums: torch.Tensor | None = None, verify: bool = True) -> Transfer:
        """Send one request's layers once `after` has passed; `checksums`, if given, were made at
        save time and are ready at `after`."""
        check_tensors(tensors, self.device)
        deadline_at = time.monotonic() + self.deadline_s
        self.send_stream.wait_event(after)
        with self.group(deadline_at):
            for t in tensors:
                t.record_stream(self.send_stream)
                self.post("ncclSend", t, self.send_stream)
        if verify:
            sums = self.checksums_beside(tensors, after) if checksums is None else checked_sums(checksums, tensors)
            sums.record_stream(self.send_stream)
            with self.group(deadline_at):
                self.post("ncclSend", sums, self.send_stream)
        return Transfer(self, list(tensors), recorded(self.send_stream))

    def checksums_beside(self, tensors: list[torch.Tensor], after: torch.cuda.Event) -> torch.Tensor:
        """Checksums made on the checksum stream while the data goes; the send stream waits for them."""
        self.sum_stream.wait_event(after)
        with torch.cuda.stream(self.sum_stream):
            sums = block_checksums(tensors)
        for t in tensors:
            t.record_stream(self.sum_stream)
        self.send_stream.wait_event(recorded(self.sum_stream))
        return sums

    def recv_blocks(self, specs: list[LayerSpec], *, verify: bool = True, block_ids=None) -> Transfer:
        """Post the receive of one request; `block_ids` only name blocks in a ChecksumError."""
        deadline_at = time.monotonic() + self.deadline_s
        with torch.cuda.stream(self.recv_stream):
            tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in specs]
        with self.group(deadline_at):
            for t in tensors:
                self.post("ncclRecv", t, self.recv_stream)
        check = self.post_check(tensors, deadline_at, block_ids) if verify else None
        return Transfer(self, tensors, recorded(self.recv_stream), check)

    def post_check(self, tensors: list[torch.Tensor], deadline_at: float, block_ids) -> ChecksumCheck:
        counts = tuple(t.shape[0] for t in tensors)
        with torch.cuda.stream(self.recv_stream):
            sent = torch.empty(sum(counts), dtype=torch.int64, device=self.device)
            with self.group(deadline_at):
                self.post("ncclRecv", sent, self.recv_stream)
            made = block_checksums(tensors)
        return ChecksumCheck(sent, made, counts, tuple(block_ids) if block_ids is not None else None)

    def post_one(self, name: str, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """One plain ncclSend or ncclRecv on `stream`, ordered by the caller (the raw baseline)."""
        with self.group(time.monotonic() + self.deadline_s):
            self.post(name, tensor, stream)

    @contextlib.contextmanager
    def group(self, deadline_at: float):
        self.lib.call("ncclGroupStart")
        try:
            yield
        finally:
            self.lib.call("ncclGroupEnd", comm=self.comm)
        self.settle(deadline_at)

    def post(self, name: str, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        pointer, count, dtype = nccl_args(tensor)
        comm = self.live_comm()
        self.lib.call(name, pointer, count, dtype, self.other, comm, stream.cuda_stream, comm=comm)

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
