"""Model files the engine cannot run, for tests that check create refuses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_qwen2_gguf(path: Path) -> Path:
    """A structurally valid GGUF of an architecture the engine has no loader for."""
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((3, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
