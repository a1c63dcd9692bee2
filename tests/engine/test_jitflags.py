"""MLX's CPU kernel compiler told to build for this CPU (engine/cpu/jitflags.py), each probe in a fresh
interpreter with its own kernel cache ($TMPDIR) and wrapper cache ($XDG_CACHE_HOME)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from support import python_probe

from mlxserve.engine.cpu import jitflags

ROOT = Path(__file__).resolve().parents[2]

needs_gxx = pytest.mark.skipif(
    shutil.which("g++") is None or not sys.platform.startswith("linux"), reason="no g++ on Linux here"
)

_PROBE = """
import json, os, shutil, glob
from mlxserve.engine.cpu import backend
info = backend.configure_blas()
import mlx.core as mx
import mlx.nn as nn
import numpy as np

x = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
with mx.stream(mx.cpu):
    y = np.array(nn.silu(mx.array(x)) * mx.array(x), dtype=np.float64)  # a run-time compiled kernel
ref = x.astype(np.float64) ** 2 / (1 + np.exp(-x.astype(np.float64)))
print(json.dumps({"cpu_jit": info.cpu_jit, "described": backend.describe_backend()["cpu_jit"],
                  "gxx": shutil.which("g++"), "path": os.environ["PATH"],
                  "kernels": len(glob.glob(os.path.join(os.environ["TMPDIR"], "mlx", "*", "cpu", "*.so"))),
                  "err": float(np.abs(y - ref).max())}))
"""


def _clean_path() -> str:
    """This process's PATH without the wrapper that its own set-up (conftest) put first."""
    return jitflags.plain_path(os.environ["PATH"])


def _probe(tmp_path: Path, **env_extra) -> dict:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path / "tmp"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
        "PATH": _clean_path(),
        **env_extra,
    }
    env.pop("MLXSERVE_SMALL_GEMM", None)  # its directory would also be the wrapper's
    return python_probe(_PROBE, env)


@needs_gxx
def test_kernels_compile_through_the_wrapper_and_stay_correct(tmp_path):
    r = _probe(tmp_path)
    wrapper = str(tmp_path / "cache" / "mlxserve")
    assert r["cpu_jit"].startswith("on (" + wrapper) and r["described"] == r["cpu_jit"]
    assert r["gxx"].startswith(wrapper) and jitflags.FLAGS in Path(r["gxx"]).read_text()
    assert r["kernels"] >= 1  # MLX really compiled, through the g++ first on PATH: the wrapper
    assert r["err"] < 1e-5
    # A second daemon reuses the wrapper; a child of a configured process does not wrap it again.
    again = _probe(tmp_path, PATH=r["path"])
    assert again["gxx"] == r["gxx"] and again["path"] == r["path"] and again["cpu_jit"] == f"on ({r['gxx']})"


@needs_gxx
def test_off_is_off_even_under_a_wrapped_parent(tmp_path):
    wrapped = _probe(tmp_path)["path"]
    r = _probe(tmp_path, MLXSERVE_JIT_NATIVE="off", PATH=wrapped)
    assert r["cpu_jit"] == "MLXSERVE_JIT_NATIVE=off" and r["path"] == _clean_path()
    assert r["gxx"] == shutil.which("g++", path=_clean_path()) and r["err"] < 1e-5


@needs_gxx
def test_a_compiler_that_refuses_the_flag_is_not_wrapped(tmp_path):
    # Fault injection (a stand-in compiler that rejects -march=native): named as such.
    fake = tmp_path / "fakebin"
    fake.mkdir()
    real = shutil.which("g++", path=_clean_path())
    (fake / "g++").write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{jitflags.FLAGS}" ] && '
        f'{{ echo "unknown option" >&2; exit 1; }}; done\nexec {real} "$@"\n'
    )
    (fake / "g++").chmod(0o755)
    path = f"{fake}{os.pathsep}{_clean_path()}"
    r = _probe(tmp_path, PATH=path)
    assert r["cpu_jit"].startswith(f"g++ {jitflags.FLAGS} failed") and r["path"] == path
    assert r["err"] < 1e-5  # MLX still compiles its kernels, as shipped
