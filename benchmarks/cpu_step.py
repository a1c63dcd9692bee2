"""Where a CPU decode step's time goes with the quantized kernels: building the graph (Python,
mlx-lm's model code), evaluating it, and within that the kernels' products (dense and experts).

    python benchmarks/cpu_step.py --model PATH.gguf [--batches 1,8] [--steps 32] [--compare-experts]

One process, the model loaded once with mlxserve's loader (the same kernels as the daemon), a
short prompt per row, then ``--steps`` decode steps per batch size; medians per step. With
``--compare-experts`` the same model is loaded a second time with its mixture-of-experts layers
left on MLX's ``mx.gather_qmm`` (everything else on the kernels) and the two alternate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tsc_per_second(kernels) -> float:
    t0, c0 = time.perf_counter(), kernels.tsc()
    time.sleep(0.05)
    return (kernels.tsc() - c0) / (time.perf_counter() - t0)


def profile(model, kernels, batch: int, steps: int, hz: float) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]] * batch), cache=cache))
    tok = mx.array([[9]] * batch)
    build, run, products = [], [], []
    for _ in range(steps):
        calls0, cycles0 = kernels.stats()
        t0 = time.perf_counter()
        y = model(tok, cache=cache)
        t1 = time.perf_counter()
        mx.eval(y)
        t2 = time.perf_counter()
        build.append(t1 - t0)
        run.append(t2 - t1)
        products.append((kernels.stats()[1] - cycles0) / hz)
    med = lambda v: 1000 * statistics.median(v)  # noqa: E731
    total = med([b + r for b, r in zip(build, run)])
    return {
        "batch": batch,
        "step_ms": round(total, 2),
        "build_ms": round(med(build), 2),
        "eval_ms": round(med(run), 2),
        "products_ms": round(med(products), 2),
        "other_eval_ms": round(med(run) - med(products), 2),
        "tok_s": round(batch * 1000 / total, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--compare-experts", action="store_true")
    args = ap.parse_args()

    from mlxserve.engine import cpu
    from mlxserve.engine.cpu import experts
    from mlxserve.engine.model import load_path

    kernels, why = cpu.load()
    if kernels is None:
        sys.exit(f"quantized CPU kernels unavailable: {why}")
    models = {"kernels": load_path(args.model).model}
    if args.compare_experts:
        real = experts.use_expert_kernels
        experts.use_expert_kernels = lambda model, kernels: 0  # experts stay on mx.gather_qmm
        try:
            models["experts on mx.gather_qmm"] = load_path(args.model).model
        finally:
            experts.use_expert_kernels = real
    hz = tsc_per_second(kernels)
    for batch in (int(b) for b in args.batches.split(",")):
        for name, model in models.items():
            print(name, profile(model, kernels, batch, args.steps, hz), flush=True)


if __name__ == "__main__":
    main()
