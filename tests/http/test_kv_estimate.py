"""The KV estimate the Scheduler budgets with follows the GGUF's own head widths."""

from types import SimpleNamespace

from mlxserve.http.generation import kv_estimate


def _spec(family: str, **info: int) -> SimpleNamespace:
    return SimpleNamespace(family=family, model_info={f"{family}.{k.replace('__', '.')}": v for k, v in info.items()})


def test_plain_heads_are_hidden_over_heads():
    spec = _spec("llama", block_count=2, embedding_length=64, attention__head_count=4, attention__head_count_kv=2)
    # K and V: 2 layers x 2 KV heads x 16 wide x 10 positions x 4 bytes x 3 sequences, twice
    assert kv_estimate(spec, 10, 3) == 2 * 2 * 2 * 16 * 10 * 4 * 3


def test_wide_heads_use_key_and_value_length():
    # gemma-style: 8 heads of 256 over a hidden size of 1152 (hidden / heads would say 144)
    spec = _spec(
        "gemma3",
        block_count=1,
        embedding_length=1152,
        attention__head_count=8,
        attention__head_count_kv=1,
        attention__key_length=256,
        attention__value_length=256,
    )
    assert kv_estimate(spec, 100, 1) == 1 * 1 * (256 + 256) * 100 * 4


def test_unknown_shape_is_zero():
    assert kv_estimate(_spec("llama", block_count=2), 10, 1) == 0
