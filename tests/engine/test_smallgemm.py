"""The few-row decode kernels in front of OpenBLAS (engine/cpu/smallgemm.py), each probe in a fresh
interpreter: which cblas_sgemm libmlx calls is fixed per process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import python_probe

from mlxserve import config
from mlxserve.engine.cpu import backend, smallgemm

ROOT = Path(__file__).resolve().parents[2]

KERNELS_HERE = smallgemm.unavailable_reason() is None and any(os.path.exists(p) for p in backend.candidate_paths())
needs_kernels = pytest.mark.skipif(
    not KERNELS_HERE,
    reason=f"small-GEMM kernels unavailable here ({smallgemm.unavailable_reason()}) or no OpenBLAS",
)

_PROBE = """
import ctypes, json, sys
from mlxserve.engine.cpu import backend
info = backend.configure_blas()
import mlx.core as mx
import numpy as np

described = backend.describe_backend()
counters = None
if info.small_gemm:
    lib = ctypes.CDLL(info.small_gemm)
    for name in ("taken", "passed", "helped"):
        getattr(lib, "mlxserve_sgemm_" + name).restype = ctypes.c_uint64
    counters = lambda: (lib.mlxserve_sgemm_taken(), lib.mlxserve_sgemm_passed(),
                        lib.mlxserve_sgemm_helped())

def check(y, ref, what):
    err = float(np.abs(np.array(y, dtype=np.float64) - ref).max() / (np.abs(ref).max() + 1e-30))
    assert err < 1e-5, (what, err)

rng = np.random.default_rng(0)
cases = 0
with mx.stream(mx.cpu):
    before = counters() if counters else None
    for rows in (1, 2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 24):
        # The last three are large enough to be shared with the helper threads.
        for k, n in ((1, 1), (15, 17), (16, 48), (33, 100), (100, 33), (576, 49), (1536, 97),
                     (576, 1536), (1536, 577), (64, 4099)):
            x = rng.standard_normal((rows, k)).astype(np.float32)
            w = rng.standard_normal((n, k)).astype(np.float32)  # nn.Linear's (out, in)
            ref = x.astype(np.float64) @ w.astype(np.float64).T
            check(mx.array(x) @ mx.array(w).T, ref, ("B transposed", rows, k, n))
            check(mx.array(x) @ mx.array(np.ascontiguousarray(w.T)), ref, ("B plain", rows, k, n))
            c = rng.standard_normal((rows, n)).astype(np.float32)
            check(mx.addmm(mx.array(c), mx.array(x), mx.array(w).T, alpha=0.5, beta=2.0),
                  0.5 * ref + 2.0 * c, ("alpha/beta", rows, k, n))
            cases += 3
    after = counters() if counters else None

    # A row's result does not depend on the rows beside it (up to MAX_ROWS rows; K=1536 takes
    # the 8-row passes).
    invariant = True
    for k in (576, 1536):
        w = mx.array(rng.standard_normal((300, k)).astype(np.float32))
        x = mx.array(rng.standard_normal((16, k)).astype(np.float32))
        batched = np.array(x @ w.T)
        alone = np.concatenate([np.array(x[i:i + 1] @ w.T) for i in range(16)])
        invariant = invariant and bool((batched == alone).all())

from mlxserve.engine.cpu import smallgemm
from pathlib import Path
names = [(t / "comm").read_text().strip() for t in Path("/proc/self/task").iterdir()]
print(json.dumps({"threads": smallgemm.threads(), "helpers": names.count("mlxserve-gemm"), "small_gemm": info.small_gemm, "reason": info.small_gemm_reason,
                  "described": described, "cases": cases, "before": before, "after": after,
                  "invariant": invariant}))
"""


def _probe(env_extra: dict[str, str]) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LD_PRELOAD", "MLXSERVE_BLAS", config.ENV_SMALL_GEMM, config.ENV_GEMM_THREADS)
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(env_extra)
    return python_probe(_PROBE, env)


@needs_kernels
def test_kernels_take_decode_products_and_match_float64(tmp_path):
    r = _probe({config.ENV_SMALL_GEMM: str(tmp_path)})  # a fresh cache: this run compiles
    assert r["reason"] == "built"
    assert r["small_gemm"] and r["small_gemm"].startswith(str(tmp_path))
    assert r["described"]["small_gemm"] is True
    assert r["described"]["blas"] == "openblas"  # the rest still goes to OpenBLAS
    taken = r["after"][0] - r["before"][0]
    passed = r["after"][1] - r["before"][1]
    # Rows 1..16 come here (10 of the 12 row counts, 3 products each, 10 shapes); 17 and 24
    # rows go on to OpenBLAS.
    assert taken >= 10 * 3 * 10
    assert passed >= 2 * 3 * 10
    assert r["invariant"]
    assert r["helpers"] == r["threads"] - 1  # named, so /proc and profilers can tell them
    if r["threads"] > 1:
        # 90 products large enough to share: a helper thread took part in some of them.
        assert r["after"][2] > r["before"][2]

    again = _probe({config.ENV_SMALL_GEMM: str(tmp_path)})
    assert again["reason"] == "cached" and again["small_gemm"] == r["small_gemm"]


@needs_kernels
def test_one_thread_gives_the_same_products(tmp_path):
    r = _probe({config.ENV_SMALL_GEMM: str(tmp_path), config.ENV_GEMM_THREADS: "1"})
    assert r["threads"] == 1 and r["small_gemm"]
    assert r["after"][2] == r["before"][2] and r["helpers"] == 0  # no helper thread exists
    assert r["invariant"] and r["cases"] > 0


@needs_kernels
def test_off_leaves_openblas_alone():
    r = _probe({config.ENV_SMALL_GEMM: "off"})
    assert r["small_gemm"] is None and r["reason"] == f"{config.ENV_SMALL_GEMM}=off"
    assert r["described"]["small_gemm"] is False and r["described"]["blas"] == "openblas"
    assert r["cases"] > 0  # every product still checked against float64


def test_failed_build_falls_back(tmp_path):
    r = _probe({config.ENV_SMALL_GEMM: str(tmp_path), "CC": "false"})
    assert r["small_gemm"] is None
    assert r["described"]["small_gemm"] is False
    assert r["cases"] > 0
    if KERNELS_HERE:
        assert r["reason"].startswith("build failed")
    assert not list(tmp_path.glob("*.so"))  # nothing half-built left to load later


def test_generated_source_has_a_kernel_for_every_row_count():
    source = smallgemm.c_source()
    for rows in range(1, smallgemm.MAX_ROWS + 1):
        assert f"static void nt_{rows}(" in source
    assert "cblas_sgemm(" in source
