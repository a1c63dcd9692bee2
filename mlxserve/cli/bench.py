"""``mlxctl bench``: throughput and latency of a running daemon, as a user sees them."""

from __future__ import annotations

import json
import statistics
import time

import asyncclick as click
import httpx
import trio

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms.",
    "List ten fruits and their colors.",
    "Describe the city of Paris.",
    "Write a poem about the sea.",
    "How do airplanes fly?",
    "Tell me about the history of tea.",
    "What makes a good friend?",
]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


async def _one(c: httpx.AsyncClient, model: str, prompt: str, tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "stream": True, "options": {"num_predict": tokens, "temperature": 0}}
    t0 = time.perf_counter()
    first = None
    final: dict = {}
    async with c.stream("POST", "/api/generate", json=body) as r:
        if r.status_code >= 400:
            raise click.ClickException(json.loads(await r.aread()).get("error", f"HTTP {r.status_code}"))
        async for line in r.aiter_lines():
            if not line.strip():
                continue
            obj = json.loads(line)
            if "error" in obj:
                raise click.ClickException(obj["error"])
            if obj.get("done"):
                final = obj
            elif first is None and obj.get("response"):
                first = time.perf_counter()
    end = time.perf_counter()
    return {
        "ttft": (first or end) - t0,
        "end": end,
        "prompt_n": final.get("prompt_eval_count", 0),
        "prompt_ns": final.get("prompt_eval_duration", 0),
        "eval_n": final.get("eval_count", 0),
        "eval_ns": final.get("eval_duration", 0),
    }


async def run_bench(
    base_url: str, model: str, concurrency: int, tokens: int, rounds: int, headers: dict[str, str] | None = None
) -> dict:
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(None, connect=5)) as c:
        await _one(c, model, "Hi", 2)  # load the model and warm up outside the measurement
        results: list[dict] = []
        t0 = time.perf_counter()

        async def worker(i: int) -> None:
            for r in range(rounds):
                results.append(await _one(c, model, PROMPTS[(i + r) % len(PROMPTS)], tokens))

        async with trio.open_nursery() as n:
            for i in range(concurrency):
                n.start_soon(worker, i)
        wall = max(r["end"] for r in results) - t0
    ttfts = [r["ttft"] for r in results]
    eval_n = sum(r["eval_n"] for r in results)
    return {
        "model": model,
        "concurrency": concurrency,
        "requests": len(results),
        "aggregate_decode_tok_s": eval_n / wall,
        "per_stream_decode_tok_s": statistics.mean(r["eval_n"] / (r["eval_ns"] / 1e9) for r in results if r["eval_ns"]),
        "prompt_tok_s": statistics.mean(r["prompt_n"] / (r["prompt_ns"] / 1e9) for r in results if r["prompt_ns"]),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p90": percentile(ttfts, 90),
        "ttft_p99": percentile(ttfts, 99),
    }


@click.command()
@click.argument("model")
@click.option("-c", "--concurrency", default=1, show_default=True, help="concurrent streams")
@click.option("-n", "--tokens", default=128, show_default=True, help="tokens to generate per request")
@click.option("-r", "--rounds", default=1, show_default=True, help="requests per stream")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
async def bench(model: str, concurrency: int, tokens: int, rounds: int, as_json: bool) -> None:
    """Measure decode and prompt tokens/s and time to first token against the running daemon."""
    from .client import auth_headers, settings as _settings

    settings = _settings()
    try:
        out = await run_bench(settings.base_url, model, concurrency, tokens, rounds, auth_headers(settings))
    except httpx.ConnectError:
        raise click.ClickException("could not connect to mlxserve; is `mlxctl serve` running?") from None
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"model {model}, {concurrency} stream(s) x {rounds} request(s), {tokens} tokens each")
    for label, key, unit in (
        ("aggregate decode", "aggregate_decode_tok_s", "tok/s"),
        ("per-stream decode", "per_stream_decode_tok_s", "tok/s"),
        ("prompt eval", "prompt_tok_s", "tok/s"),
        ("TTFT p50", "ttft_p50", "s"),
        ("TTFT p90", "ttft_p90", "s"),
        ("TTFT p99", "ttft_p99", "s"),
    ):
        click.echo(f"  {label:<18} {out[key]:>10.3f} {unit}")


COMMANDS = [bench]
