"""A create killed with SIGKILL at an injected point leaves the store consistent."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlxserve.engine import convert
from mlxserve.errors import ModelNotFound
from mlxserve.store import Store, manifest as mt

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
from pathlib import Path
from mlxserve.engine import convert
from mlxserve.store import Store
root, name, modelfile, base, fault = sys.argv[1:6]
Store(Path(root), kill_at_stage=fault or None, converter=convert).create(name, modelfile, base_dir=Path(base))
"""


def run_create(root: Path, name: str, modelfile: str, base: Path, fault: str | None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root), name, modelfile, str(base), fault or ""],
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
    )


def assert_consistent(store: Store):
    """Every manifest's blobs are present and intact, and prune leaves no orphan."""
    store.prune()
    refs: set[str] = set()
    for m in store.list():
        store.verify_for_load(m)
        refs |= mt.referenced_digests(m.manifest)
    assert {p.name.replace("-", ":", 1) for p in store.blobs_dir.iterdir()} == refs
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("stage", ["blob", "before_manifest"])
def test_killed_first_create_leaves_nothing(tmp_path, tiny_llama_dir, stage):
    root = tmp_path / "models"
    proc = run_create(root, "tiny", "FROM tiny-llama\nSYSTEM one\n", tiny_llama_dir.parent, stage)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = Store(root)
    assert any(store.blobs_dir.iterdir())  # the crash did leave blobs behind...
    with pytest.raises(ModelNotFound):
        store.resolve("tiny")
    assert_consistent(store)  # ...which prune collects
    assert not any(store.blobs_dir.iterdir())
    proc = run_create(root, "tiny", "FROM tiny-llama\nSYSTEM one\n", tiny_llama_dir.parent, None)
    assert proc.returncode == 0, proc.stderr
    assert Store(root).resolve("tiny").spec.system == "one"
    assert_consistent(store)


@pytest.mark.parametrize("stage", ["blob", "before_manifest"])
def test_killed_replacement_keeps_the_old_model(tmp_path, tiny_llama_dir, stage):
    root = tmp_path / "models"
    store = Store(root, converter=convert)
    old = store.create("tiny", "FROM tiny-llama\nSYSTEM old\n", base_dir=tiny_llama_dir.parent)
    proc = run_create(root, "tiny", "FROM tiny-llama\nSYSTEM new\n", tiny_llama_dir.parent, stage)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    now = store.resolve("tiny")
    assert now.digest == old.digest and now.spec.system == "old"
    assert_consistent(store)
    proc = run_create(root, "tiny", "FROM tiny-llama\nSYSTEM new\n", tiny_llama_dir.parent, None)
    assert proc.returncode == 0, proc.stderr
    assert store.resolve("tiny").spec.system == "new"
    assert_consistent(store)
