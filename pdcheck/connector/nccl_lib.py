"""libnccl.so.2 through ctypes: finding the library, its prototypes, checked calls.

Where it looks, in order: PDCHECK_NCCL_LIB, the `nvidia/nccl/lib` folder of the
nvidia-nccl-cu12/-cu13 package, beside torch's libraries, then the system loader's path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import importlib.util
import os
import sys
from pathlib import Path

import torch

LIB_NAME = "libnccl.so.2"
SUCCESS, IN_PROGRESS = 0, 7
NCCL_DTYPES = {torch.int8: 0, torch.uint8: 1, torch.bool: 1, torch.int32: 2, torch.int64: 4,
               torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9}


class NcclError(RuntimeError):
    """NCCL refused a call or failed a communicator."""


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
        return self.check(name, getattr(self.cdll, name)(*args), comm)

    def check(self, name: str, result: int, comm=None) -> int:
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
