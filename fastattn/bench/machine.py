"""The machine a run happened on, and its roofline limits checked against a measured copy.

:func:`describe` gives the CPU model and core count, the GPU's name, and
:func:`fastattn.info` (versions, backends).  :func:`limits` measures the memory-copy
bandwidth of the device (a device-to-device copy on a GPU, a 256 MiB tensor copy on a
CPU; bytes read plus bytes written per second) and returns the
:class:`fastattn.roofline.DeviceLimits` to rate the run against: the known card's
datasheet peaks on a recognised GPU (with the measured copy as a sanity check; float32
matrix work at the TF32 peak when torch's float32 matmul precision allows TF32, else at
the CUDA cores'), the measured copy bandwidth alone on a CPU or an unknown GPU (whose
% of limit is shown but judges no target of the form "% of the memory limit").
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

from fastattn import roofline
from fastattn.bench.timing import time_call
from fastattn.info import info
from fastattn.ops.triton_launch import dot_precision

COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
COPY_MIN_RUN_TIME = 0.2
# A copy reaching less than this fraction of the datasheet bandwidth, or more than it,
# means the card was misidentified or is throttled / shared: the run says so.
PLAUSIBLE_COPY_FRACTION = (0.5, 1.05)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "platform": platform.platform(),
        **info(),
    }


def copy_bandwidth(device: str) -> float:
    """Bytes per second moved (read + written) by copying one large tensor into another."""
    source = torch.empty(COPY_BYTES[device], dtype=torch.uint8, device=device).fill_(1)
    destination = torch.empty_like(source)
    timing = time_call(lambda: destination.copy_(source), device, COPY_MIN_RUN_TIME)
    return 2 * source.numel() / timing.median_s


@dataclass(frozen=True)
class Limits:
    device: roofline.DeviceLimits
    measured_copy_bandwidth: float  # bytes/s
    note: str  # where the limits come from, and any doubt about them
    # Whether the limits are a known card's datasheet peaks: a % of a measured copy is shown
    # but judges no target stated against the hardware's peak.
    from_datasheet: bool = False

    def as_dict(self) -> dict:
        return {
            "name": self.device.name,
            "bandwidth": self.device.bandwidth,
            "flops": self.device.flops,
            "transcendentals": self.device.transcendentals,
            "measured_copy_bandwidth": self.measured_copy_bandwidth,
            "note": self.note,
            "from_datasheet": self.from_datasheet,
        }


def limits(device: str) -> Limits:
    measured = copy_bandwidth(device)
    if device == "cpu":
        return Limits(roofline.cpu_limits(measured), measured, "CPU: % of limit is against the measured copy bandwidth only")
    name = torch.cuda.get_device_name()
    card = roofline.known_gpu(name)
    if card is None:
        note = f"{name} is not in fastattn.roofline.KNOWN_GPUS: % of limit is against the measured copy bandwidth only"
        return Limits(roofline.DeviceLimits(name, measured, {}, None), measured, note)
    if dot_precision(torch.float32) == "tf32":  # torch's float32 matmuls, and the Triton kernels', on TF32
        card = roofline.float32_on_tf32(card)
    fraction = measured / card.bandwidth
    note = f"{name} rated as {card.name}; measured copy reaches {fraction:.0%} of its datasheet bandwidth"
    low, high = PLAUSIBLE_COPY_FRACTION
    if not low <= fraction <= high:
        note += " (implausible: misidentified, throttled or shared card)"
    return Limits(card, measured, note, from_datasheet=True)
