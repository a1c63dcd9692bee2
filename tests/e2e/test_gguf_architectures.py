"""Every GGUF architecture mlxserve imports, end to end on a real daemon: created from the file
(as it is, or converted), shown with its family, size, quantization and capabilities, and served
through Ollama's chat and OpenAI's completions with logprobs (official clients)."""

from __future__ import annotations

import ollama
import openai
import trio

from mlxserve.testing import ggufmodels

# Q8_0 files are served as they are, Q4_K ones converted at create: both paths, every arch
QUANT = {
    "llama": "Q4_K",
    "qwen2": "Q8_0",
    "qwen3": "Q4_K",
    "qwen3moe": "Q8_0",
    "gemma2": "Q4_K",
    "gemma3": "Q8_0",
    "phi3": "Q4_K",
    "gpt-oss": "Q4_K",
}  # + MXFP4 experts


def serve_all(url: str, paths: dict) -> dict:
    client = ollama.Client(host=url)
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    out = {}
    try:
        for arch, path in paths.items():
            name = f"tiny-{arch}"
            client.create(model=name, from_=str(path))
            shown = client.show(name)
            chat = client.chat(
                model=name, messages=[{"role": "user", "content": "Hi"}], options={"temperature": 0, "num_predict": 3}
            )
            done = oa.completions.create(model=name, prompt="The capital of", max_tokens=2, temperature=0, logprobs=3)
            out[arch] = (shown, chat, done)
    finally:
        client._client.close()
        oa.close()
    return out


async def test_each_architecture_is_created_shown_and_served(daemon, tmp_path):
    paths = {arch: ggufmodels.write(tmp_path / f"{arch}.gguf", arch, quant) for arch, quant in QUANT.items()}
    with trio.fail_after(300):
        results = await trio.to_thread.run_sync(serve_all, daemon.url, paths)
    for arch, (shown, chat, done) in results.items():
        d = shown.details
        assert (d.family, d.families) == (arch, [arch]), arch
        assert d.format == ("safetensors" if QUANT[arch] == "Q4_K" else "gguf"), arch
        assert d.quantization_level == {"Q4_K": "Q4_K_S->Q4", "Q8_0": "Q8_0"}[QUANT[arch]], arch
        assert d.parameter_size.endswith("M"), (arch, d.parameter_size)
        assert "completion" in shown.capabilities, arch
        what = (
            "4-bit group 32 (exact), 5 bits a weight"
            if QUANT[arch] == "Q4_K"
            else "8-bit group 32 (exact), 9 bits a weight"
        )
        assert shown.modelinfo["mlxserve.tensor_types"][QUANT[arch]] == what, arch
        if arch == "gpt-oss":
            assert shown.modelinfo["mlxserve.tensor_types"]["MXFP4"] == ("mxfp4 group 32 (exact), 4.25 bits a weight")
        # random weights may pick the end token early
        assert chat.message.role == "assistant" and 1 <= chat.eval_count <= 3, arch
        assert 1 <= done.usage.completion_tokens <= 2, arch
        top = done.choices[0].logprobs.top_logprobs[0]  # keyed by text: byte tokens may share one
        assert 1 <= len(top) <= 3 and all(v <= 0 for v in top.values()), arch
