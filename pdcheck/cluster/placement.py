"""Where each instance of a deployment runs: pinned to a CPU core, or on its own GPUs.

A Layout is asked for the placements of a list of roles (oracle, prefills, decodes, in that
order) and answers one Placement each, before anything starts. On CPU each instance is pinned to
one core, round-robin over this process's allowed cores. On CUDA each instance takes as many
GPUs as its role's tensor-parallel size, in order, round-robin over the layout's GPUs; an
instance that shares a GPU with others gets an even share of MEMORY_BUDGET_PERCENT of its memory
(rounded down to a hundredth: the rest is headroom for each process's CUDA context), and one
alone on its GPUs keeps vLLM's default. `pdcheck run --dry-run` prints these placements.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import importlib.util
import os
from typing import Any

from pdcheck.errors import BadInput
from pdcheck.profiles import REFERENCE_CLASS
from pdcheck.specs import REFERENCE, Role

MEMORY_BUDGET_PERCENT = 90  # of each GPU's memory, split among the instances that share it


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclasses.dataclass(frozen=True)
class Placement:
    """One instance's place: the cores it is pinned to (none: not pinned), the GPUs it sees
    (its CUDA_VISIBLE_DEVICES; none on CPU), its tensor-parallel size, and its share of each of
    its GPUs' memory where it shares one (None: vLLM's default)."""

    cpus: tuple[int, ...] = ()
    gpus: tuple[str, ...] = ()
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None

    @property
    def devices(self) -> str:
        if not self.gpus:
            return f"CPU {','.join(map(str, self.cpus))}" if self.cpus else "CPU (not pinned)"
        return f"{gpu_names(self.gpus)}{' (shared)' if self.gpu_memory_utilization else ''}"

    def env(self) -> dict[str, str]:
        """Environment the instance's process gets on top of the parent's."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)} if self.gpus else {}

    def engine_args(self) -> dict[str, Any]:
        """vLLM engine arguments this placement sets (none on CPU)."""
        if not self.gpus:
            return {}
        args = {"tensor_parallel_size": self.tensor_parallel_size,
                "distributed_executor_backend": "uni" if self.tensor_parallel_size == 1 else "mp"}
        if self.gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        return args


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a deployment is placed: the device, the GPUs to use (CUDA_VISIBLE_DEVICES ids, CUDA
    only) and the tensor-parallel size of each role. Invalid combinations raise BadInput."""

    device: Device = Device.CPU
    gpus: tuple[str, ...] = ()
    prefill_tp: int = 1
    decode_tp: int = 1
    oracle_tp: int = 1

    def __post_init__(self):
        for role in Role:
            if self.tp(role) < 1:
                raise BadInput(f"{tp_option(role)} {self.tp(role)}: must be at least 1")
            if self.device is Device.CPU and self.tp(role) > 1:
                raise BadInput(f"{tp_option(role)} {self.tp(role)}: tensor parallelism needs --device cuda")
            if self.device is Device.CUDA and self.tp(role) > len(self.gpus):
                raise BadInput(f"{tp_option(role)} {self.tp(role)}: more than the GPUs planned for "
                               f"({gpu_names(self.gpus)})")
        if self.device is Device.CPU and self.gpus:
            raise BadInput(f"gpus {self.gpus}: a CPU layout places no GPU")

    def tp(self, role: Role) -> int:
        return {Role.SINGLE: self.oracle_tp, Role.PREFILL: self.prefill_tp, Role.DECODE: self.decode_tp}[role]

    def place(self, roles: list[Role]) -> list[Placement]:
        """One placement per role, in order."""
        if self.device is Device.CPU:
            return cpu_plan(len(roles))
        return gpu_plan(self.gpus, [self.tp(role) for role in roles])


def check_connector_fits(layout: Layout, connectors) -> None:
    """Refuse, before anything starts, a layout the connector cannot run in: the reference
    connector listens on one port per instance, which every rank of a tensor-parallel instance
    would try to bind."""
    tp = max(layout.prefill_tp, layout.decode_tp)
    for connector in connectors:
        if tp > 1 and (connector.name == REFERENCE or REFERENCE_CLASS in connector.lineage):
            raise BadInput(f"tensor-parallel size {tp} with the reference connector: it listens on one port per "
                           f"instance, which each rank would bind; run it at --prefill-tp 1 --decode-tp 1")


def gpu_names(gpus: tuple[str, ...]) -> str:
    """E.g. "GPU 3", "2 GPUs 0,1", "no GPU"."""
    names = ",".join(gpus)
    return "no GPU" if not gpus else f"GPU {names}" if len(gpus) == 1 else f"{len(gpus)} GPUs {names}"


def tp_option(role: Role) -> str:
    return {Role.SINGLE: "--oracle-tp", Role.PREFILL: "--prefill-tp", Role.DECODE: "--decode-tp"}[role]


def cpu_plan(count: int) -> list[Placement]:
    """`count` placements of one core each, round-robin over this process's allowed cores."""
    cpus = sorted(os.sched_getaffinity(0))
    return [Placement(cpus=(cpus[i % len(cpus)],)) for i in range(count)]


def gpu_plan(gpus: tuple[str, ...], sizes: list[int]) -> list[Placement]:
    """A group of `size` GPUs per instance, taken in order round-robin over `gpus`; an
    instance's memory share is set by the most crowded GPU of its group."""
    groups, cursor = [], 0
    for size in sizes:
        groups.append([(cursor + k) % len(gpus) for k in range(size)])
        cursor += size
    crowd = collections.Counter(index for group in groups for index in group)
    return [Placement(gpus=tuple(gpus[i] for i in group), tensor_parallel_size=len(group),
                      gpu_memory_utilization=memory_share(max(crowd[i] for i in group))) for group in groups]


def memory_share(sharers: int) -> float | None:
    """Each sharer's gpu_memory_utilization; None for an instance alone on its GPUs."""
    return None if sharers == 1 else (MEMORY_BUDGET_PERCENT // sharers) / 100


def choose_layout(device: str | None, num_gpus: int | None, plan_only: bool, **tps: int) -> Layout:
    """The layout `pdcheck run` asked for. Device: as given, else CUDA where --gpus is given or
    a GPU is visible, else CPU. GPUs: the first `num_gpus` (default all) visible ones; with
    `plan_only` (a dry run), `num_gpus` GPUs named 0..N-1 whatever this machine has. A real run
    asking for more GPUs than are visible is BadInput naming both; so is CUDA with no GPU.
    `tps`: Layout's tensor-parallel sizes (prefill_tp, decode_tp, oracle_tp)."""
    if device == Device.CPU.value:
        if num_gpus:
            raise BadInput(f"--gpus {num_gpus}: GPUs place instances on CUDA; not with --device cpu")
        return Layout(Device.CPU, **tps)
    if num_gpus is not None and num_gpus < 1:
        raise BadInput(f"--gpus {num_gpus}: must be at least 1")
    if plan_only and num_gpus:
        return Layout(Device.CUDA, numbered(num_gpus), **tps)
    visible = visible_gpus()
    if device is None and num_gpus is None and not visible:
        return Layout(Device.CPU, **tps)
    if num_gpus is not None and num_gpus > len(visible):
        raise BadInput(f"--gpus {num_gpus}: this machine has {gpu_names(visible)}; "
                       f"--dry-run --gpus {num_gpus} plans for such a runner without starting anything")
    if not visible:
        raise BadInput("--device cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                       "--dry-run --gpus N plans for a runner of N GPUs without starting anything")
    return Layout(Device.CUDA, visible[:num_gpus], **tps)


def numbered(count: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(count))


def visible_gpus() -> tuple[str, ...]:
    """The CUDA_VISIBLE_DEVICES ids of the GPUs this process sees (torch's count, named as in
    this process's CUDA_VISIBLE_DEVICES where that is set); none without torch or CUDA."""
    if importlib.util.find_spec("torch") is None:
        return ()
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = inherited.split(",") if inherited else [str(i) for i in range(count)]
    return tuple(name.strip() for name in names[:count])
