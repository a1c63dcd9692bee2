"""MLX's CPU kernel compiler, told to build for this CPU.

MLX fuses elementwise work (SiLU times the up projection in every MLP, RMSNorm pieces) into C++
kernels it compiles at run time with ``g++ -std=c++17 -O3 ...`` found on PATH, with no ``-march``:
baseline x86-64, scalar code. A ``g++`` wrapper that adds ``-march=native``, first on this
process's PATH, makes those kernels vector code (figures: benchmarks/results/history-cpu.md).

MLX caches the kernels by name under ``$TMPDIR/mlx/<version>/cpu`` whatever flags built them, so
kernels already there (from a process without the wrapper) are reused as they are; ones built
through the wrapper suit only CPUs like this one, which is what a machine's own /tmp holds.
``MLXSERVE_JIT_NATIVE=off`` leaves PATH alone.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ...config import ENV_JIT_NATIVE, CpuSettings
from .machine import cpu_flags

FLAGS = "-march=native"
_MARK = "mlxserve-jit-wrapper"  # a line in the wrapper: PATH already leads to one
_PROBE = 'extern "C" float f(const float *a, int n) { float s = 0; for (int i = 0; i < n; i++) s += a[i] * a[i]; return s; }\n'


def is_wrapper_dir(folder: str) -> bool:
    try:
        return _MARK in (Path(folder) / "g++").read_text(errors="replace")[:400]
    except OSError:
        return False


def plain_path(path: str) -> str:
    """``path`` without wrapper folders (a parent process may have put one first)."""
    return os.pathsep.join(d for d in path.split(os.pathsep) if not is_wrapper_dir(d))


def install() -> str:
    """Put the wrapper first on PATH (building it once per compiler); say what happened."""
    cpu = CpuSettings.from_env()
    if not cpu.jit_native:
        os.environ["PATH"] = plain_path(os.environ.get("PATH", ""))  # off here, whatever the parent did
        return f"{ENV_JIT_NATIVE}=off"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    gxx = shutil.which("g++")
    if gxx is None:
        return "no g++ (MLX compiles no CPU kernels)"
    if is_wrapper_dir(os.path.dirname(gxx)):
        return f"on ({gxx})"  # inherited from a parent process
    try:  # the compiler's identity without running it at every start: an upgrade changes it
        st = os.stat(gxx)
    except OSError as exc:
        return f"g++ unusable: {exc}"
    ident = f"{os.path.realpath(gxx)}:{st.st_size}:{st.st_mtime_ns}"
    key = hashlib.sha256("\0".join([ident, FLAGS, cpu_flags()]).encode()).hexdigest()[:16]
    folder = cpu.cache_dir / f"jit-{key}"
    wrapper = folder / "g++"
    if not wrapper.exists():
        why = _build(gxx, wrapper)
        if why:
            return why
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
    return f"on ({wrapper})"


def _build(gxx: str, wrapper: Path) -> str | None:
    """Check that the compiler takes the flags for a shared library, then write the wrapper
    (atomically: concurrent daemons write the same bytes)."""
    try:
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wrapper.parent) as tmp:
            src = Path(tmp) / "probe.cpp"
            src.write_text(_PROBE)
            done = subprocess.run(
                [gxx, "-std=c++17", "-O3", FLAGS, "-fPIC", "-shared", str(src), "-o", str(Path(tmp) / "probe.so")],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                return f"g++ {FLAGS} failed: {done.stderr.strip()[-200:]}"
            script = Path(tmp) / "g++"
            script.write_text(
                f'#!/bin/sh\n# {_MARK}: MLX\'s CPU kernels, built for this CPU\nexec {shlex.quote(gxx)} {FLAGS} "$@"\n'
            )
            script.chmod(0o755)
            os.replace(script, wrapper)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"wrapper not written: {exc}"
    return None
