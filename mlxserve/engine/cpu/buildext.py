"""Build the quantized CPU kernels (qmm.cpp) against the installed mlx wheel.

The extension is an MLX C++ primitive with a nanobind binding in MLX's nanobind domain (as
mlx's examples/extensions does), compiled with the system g++ (``-O3 -march=native``: the
vector path this CPU has) into ``~/.cache/mlxserve`` (``CpuSettings.cache_dir``), keyed by the source,
compiler, CPU flags and the mlx, nanobind and Python versions. nanobind's own sources are
compiled once into an object of their own, reused while only qmm.cpp changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from ...config import ENV_QKERNELS as ENV, CpuSettings
from . import jitflags
from .machine import cpu_flags

SOURCE = Path(__file__).with_name("qmm.cpp")
HEADERS = [Path(__file__).with_name("qmm_tile.h")]  # included by SOURCE: part of the cache key
FLAGS = [
    "-std=c++20",
    "-O3",
    "-march=native",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-DNDEBUG",
    "-DNB_DOMAIN=mlx",
]


def _compiler() -> str | None:
    path = jitflags.plain_path(os.environ.get("PATH", ""))  # the real g++, not MLX's wrapper
    return shutil.which(os.environ.get("CXX", "g++"), path=path) or shutil.which("g++", path=path)


def _dirs() -> dict[str, Path] | None:
    try:
        import mlx.core
        import nanobind
    except ImportError:
        return None
    mlx_root = Path(mlx.core.__file__).parent
    nb_root = Path(nanobind.__file__).parent
    return {
        "mlx_include": mlx_root / "include",
        "mlx_lib": mlx_root / "lib",
        "nb_include": nb_root / "include",
        "nb_map": nb_root / "ext" / "robin_map" / "include",
        "nb_src": nb_root / "src" / "nb_combined.cpp",
        "py_include": Path(sysconfig.get_paths()["include"]),
    }


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here (None: they can)."""
    if not CpuSettings.from_env().qkernels:
        return f"{ENV}=off"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return "not x86-64 Linux"
    if _compiler() is None:
        return "no C++ compiler (g++; Debian: apt-get install g++)"
    dirs = _dirs()
    if dirs is None:
        return "nanobind is not installed (pip install nanobind)"
    missing = [str(p) for p in dirs.values() if not p.exists()]
    if missing:
        return f"missing {missing[0]} (mlx headers, nanobind sources or Python.h: apt-get install python3-dev)"
    return None


def _key(cxx: str, *parts: str) -> str:
    import mlx.core as mx
    import nanobind

    st = os.stat(cxx)
    ident = f"{os.path.realpath(cxx)}:{st.st_size}:{st.st_mtime_ns}"
    text = "\0".join([ident, " ".join(FLAGS), cpu_flags(), mx.__version__, nanobind.__version__, sys.version, *parts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile(args: list[str], target: Path) -> str | None:
    """Run the compiler into a temporary file, then move it into place atomically (concurrent
    builders write the same bytes). Returns the error, or None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([*args, "-o", str(out)], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return done.stderr.strip()[-400:]
        os.replace(out, target)
    return None


def _prune(cache: Path, keep: Path) -> None:
    """Remove builds of older sources (a process that loaded one keeps its mapping). Only those
    untouched for a while: another process may be building a different source right now."""
    import time

    for old in cache.glob("qkernels-*"):
        try:
            if old != keep and time.time() - old.stat().st_mtime > 600:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def build() -> tuple[Path | None, str]:
    """The compiled extension (built now, or found in the cache) and what happened."""
    why = unavailable_reason()
    if why:
        return None, why
    cxx, d = _compiler(), _dirs()
    includes = [f"-I{d[k]}" for k in ("nb_include", "nb_map", "mlx_include", "py_include")]
    source = "\0".join(p.read_text() for p in (SOURCE, *HEADERS))
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    cache = CpuSettings.from_env().cache_dir
    try:
        nb_obj = cache / f"nanobind-{_key(cxx, 'nanobind')}.o"
        target = cache / f"qkernels-{_key(cxx, source)}" / f"_qmm{suffix}"
        if target.exists():
            return target, "cached"
        if not nb_obj.exists():
            err = _compile([cxx, *FLAGS, *includes, "-c", str(d["nb_src"])], nb_obj)
            if err:
                return None, f"nanobind build failed: {err}"
        err = _compile(
            [
                cxx,
                *FLAGS,
                *includes,
                "-shared",
                str(SOURCE),
                str(nb_obj),
                f"-L{d['mlx_lib']}",
                "-lmlx",
                f"-Wl,-rpath,{d['mlx_lib']}",
            ],
            target,
        )
        if err:
            return None, f"build failed: {err}"
        _prune(cache, keep=target.parent)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"build failed: {exc}"
    return target, "built"
