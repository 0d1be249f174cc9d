"""How much device memory a batch may use, and what it really used.

Three probes behind one interface:
- `NvmlProbe` on a CUDA machine: free memory from NVML (plus what torch's caching
  allocator holds unused), peaks from `torch.cuda.max_memory_allocated`;
- `SimulatedProbe`: a configured budget, and torch's real `OutOfMemoryError`
  whenever a pipeline call's true cost exceeds it, so the whole adaptive path
  (estimate, split, retry, record, unhealthy) runs on a CPU;
- `CpuProbe`: no device memory to manage; batches are bounded by count only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import structlog

from workers.config import ModelConfig
from workers.jobs import ImageJob

log = structlog.get_logger("cutover.memory")

T = TypeVar("T")


def pixels(job: ImageJob) -> int:
    return job.width * job.height


class MemoryProbe(Protocol):
    name: str

    def free_bytes(self) -> int | None:
        """Bytes a batch may use now, or None where memory is not managed (CPU)."""

    def run(self, jobs: list[ImageJob], call: Callable[[], T]) -> tuple[T, int | None]:
        """Run one pipeline call for `jobs`; return its result and its peak bytes."""

    def release(self) -> None:
        """Give cached memory back after an out-of-memory error."""


class CpuProbe:
    name = "cpu"

    def __init__(self) -> None:
        log.info(
            "memory_probe",
            probe=self.name,
            note="no CUDA device or NVML: batches are bounded by count only",
        )

    def free_bytes(self) -> int | None:
        return None

    def run(self, jobs: list[ImageJob], call: Callable[[], T]) -> tuple[T, int | None]:
        return call(), None

    def release(self) -> None:
        pass


class SimulatedProbe:
    """A pretend device of `budget` bytes where a call costs `bytes_per_pixel` per image pixel."""

    name = "simulated"

    def __init__(self, budget: int, bytes_per_pixel: float) -> None:
        self.budget = budget
        self.bytes_per_pixel = bytes_per_pixel
        self.peak_seen = 0

    def cost(self, jobs: list[ImageJob]) -> int:
        return int(sum(pixels(j) for j in jobs) * self.bytes_per_pixel)

    def free_bytes(self) -> int | None:
        return self.budget

    def run(self, jobs: list[ImageJob], call: Callable[[], T]) -> tuple[T, int | None]:
        import torch

        cost = self.cost(jobs)
        if cost > self.budget:
            raise torch.OutOfMemoryError(
                f"simulated CUDA out of memory: tried to allocate {cost / 2**20:.1f} MiB "
                f"with a budget of {self.budget / 2**20:.1f} MiB"
            )
        self.peak_seen = max(self.peak_seen, cost)
        return call(), cost

    def release(self) -> None:
        pass


class NvmlProbe:
    """Free memory from NVML, the device's own view (other processes included)."""

    name = "nvml"

    def __init__(self, device_index: int = 0, limit: int | None = None) -> None:
        import pynvml
        import torch

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self._torch = torch
        self.device_index = device_index
        total = pynvml.nvmlDeviceGetMemoryInfo(self._handle).total
        self.limit = limit
        if limit:
            # Make the cap real: torch's allocator refuses beyond it with a genuine OOM.
            torch.cuda.set_per_process_memory_fraction(min(limit / total, 1.0), device_index)
        log.info(
            "memory_probe",
            probe=self.name,
            device=device_index,
            total_bytes=total,
            limit_bytes=limit,
        )

    def free_bytes(self) -> int | None:
        cuda = self._torch.cuda
        cached_unused = cuda.memory_reserved(self.device_index) - cuda.memory_allocated(
            self.device_index
        )
        free = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).free + cached_unused
        if self.limit:
            free = min(free, self.limit - cuda.memory_allocated(self.device_index))
        return max(free, 0)

    def run(self, jobs: list[ImageJob], call: Callable[[], T]) -> tuple[T, int | None]:
        cuda = self._torch.cuda
        before = cuda.memory_allocated(self.device_index)
        cuda.reset_peak_memory_stats(self.device_index)
        result = call()
        return result, max(cuda.max_memory_allocated(self.device_index) - before, 0)

    def release(self) -> None:
        self._torch.cuda.empty_cache()


def make_probe(model: ModelConfig, device: str) -> MemoryProbe:
    """The probe a model server uses; NVML is tried once and never again if absent."""
    if model.simulated_memory is not None:
        return SimulatedProbe(model.simulated_memory.budget, model.simulated_memory.bytes_per_pixel)
    if not device.startswith("cuda"):
        return CpuProbe()
    try:
        index = int(device.split(":")[1]) if ":" in device else 0
        return NvmlProbe(index, model.gpu_memory_limit)
    except Exception as exc:  # NVML library missing or failing: fall back once, loudly
        log.warning("nvml_unavailable", error=str(exc))
        return CpuProbe()
