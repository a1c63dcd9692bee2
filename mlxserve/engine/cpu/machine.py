"""What the CPU bootstrap and the kernels ask of this machine: usable cores, the CPU's flags.

Its own module so that the BLAS bootstrap (backend.py), the kernels it loads (smallgemm.py), the
JIT wrapper (jitflags.py) and the quantized kernels' build (buildext.py) share it without
importing each other in a circle.
"""

from __future__ import annotations

import os


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo ("" where there is none): part of every build's cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
