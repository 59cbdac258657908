"""Size the work to the device: CPU threads for torch, and how much prompt a completion may prefill.

Measured on a 2-core VM shared with other jobs, SmolLM2-135M fp32: a decode step took ~70 ms on one
thread and 70-1100 ms on two (two threads only win while nothing else runs, and then only for prefill);
torch's default of one thread per logical CPU is the worst choice on a busy machine. So: one thread per
physical core, minus one for the editor and everything else, at most 8 (batch-1 decode is memory-bound
and gains nothing from more). A GPU prefills a 3k-token window in ~40 ms; one CPU core needs ~1.7 s for
512 tokens, so its window is a quarter of the GPU's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .prompt import PromptBudget

MAX_THREADS = 8
# ~500-650 prompt tokens on real files: 1.4-2.0 s of cold prefill on one busy core, then ~65 ms a token.
CPU_BUDGET = dataclasses.replace(PromptBudget(), prefix_tokens=768, suffix_tokens=96, context_tokens=256)


def physical_cores(cpus: set[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Cores among the CPUs this process may run on, SMT siblings counted once."""
    cpus = cpus if cpus is not None else available_cpus()
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add((topology / "physical_package_id").read_text().strip() + ":" + (
                topology / "core_id").read_text().strip())
        except OSError:  # no sysfs (not Linux, or hidden): count the CPU as its own core
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def available_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return set(range(os.cpu_count() or 1))


def cpu_threads(explicit: int | None = None, env: Mapping[str, str] = os.environ, cores: int | None = None) -> int:
    """Threads for torch on the CPU: `explicit` if given, else OMP_NUM_THREADS if set, else physical
    cores minus one, between 1 and MAX_THREADS."""
    if explicit is not None:
        return max(1, explicit)
    try:
        from_env = int(env.get("OMP_NUM_THREADS", ""))
        if from_env > 0:
            return from_env
    except ValueError:
        pass
    cores = cores if cores is not None else physical_cores()
    return min(MAX_THREADS, max(1, cores - 1))


def configure_threads(device: torch.device, explicit: int | None = None) -> int:
    """Set torch's intra-op thread count for a CPU engine (a GPU one leaves it: the host only launches
    kernels); returns the count in effect."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(explicit))
    return torch.get_num_threads()


def default_budget(device: torch.device) -> PromptBudget:
    """The prompt window a cold completion can afford on this device in a few seconds."""
    return PromptBudget() if device.type == "cuda" else CPU_BUDGET
