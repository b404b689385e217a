"""``fastattn bench``: every op on every available backend against its peers.

For each case (one op at one shape, forward or forward+backward; see
:mod:`fastattn.bench.cases`) and each implementation that runs it (fastattn's
backends, the torch.compile'd reference, torch's own modules and fused attention), a
run records the median time and interquartile range, the max error against a float64
oracle, the peak memory, the share of the device's roofline limit and the speedup
against every other implementation measured in the same run.

    cases.py            the cases and presets (tiny, quick, full; gpu: the issues' GPU targets)
    implementations.py  who runs a case; the call that is timed
    timing.py           CPU and CUDA timers
    memory.py           peak memory (CUDA allocator; a child process's resident set on CPU)
    machine.py          the machine description and its measured copy bandwidth
    run.py              the loop over cases and implementations
    output.py           table, JSON, CSV, PNG
"""

from fastattn.bench.cases import DTYPES, PRESETS, BenchError, Case, Preset, cases, select
from fastattn.bench.run import DEVICES, Result, check_device, choose, preset_named, run

__all__ = [
    "DTYPES", "PRESETS", "DEVICES", "BenchError", "Case", "Preset", "Result",
    "cases", "select", "check_device", "choose", "preset_named", "run",
]
