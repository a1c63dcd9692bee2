"""Settings read from MLXSERVE_* variables: the admission window, the CPU bootstrap, the ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxserve import config
from mlxserve.config import AdmitWindow, CpuSettings, DistSettings, Settings


def test_admit_window_default_and_override():
    assert Settings.from_env({}).admit_window == AdmitWindow(gap_s=0.010, max_s=0.150)
    w = Settings.from_env({"MLXSERVE_ADMIT_WINDOW": "20,300"}).admit_window
    assert (w.gap_s, w.max_s, w.first_gap_s) == (0.020, 0.300, 0.003)
    # a gap under the 3 ms first gap shortens that too; 0,0 admits only what is already queued
    assert AdmitWindow.parse("1,5").first_gap_s == 0.001
    assert AdmitWindow.parse("0,0") == AdmitWindow(gap_s=0.0, max_s=0.0)


@pytest.mark.parametrize("text", ["10", "a,b", "10,5", "-1,5", "10,20000", "1,2,3"])
def test_bad_admit_window_names_the_setting(text):
    with pytest.raises(ValueError, match="MLXSERVE_ADMIT_WINDOW"):
        Settings.from_env({"MLXSERVE_ADMIT_WINDOW": text})


def test_bad_number_names_the_setting():
    with pytest.raises(ValueError, match="MLXSERVE_NUM_PARALLEL must be a whole number"):
        Settings.from_env({"MLXSERVE_NUM_PARALLEL": "x"})


# --- the CPU bootstrap's and the ranks' settings (read before Settings: CpuSettings, DistSettings)


def test_cpu_settings_defaults_and_values():
    d = CpuSettings.from_env({"XDG_CACHE_HOME": "/c"})
    assert d == CpuSettings("auto", True, Path("/c/mlxserve"), None, True, True, submit_layers=2, reexec_child=False)
    s = CpuSettings.from_env(
        {
            config.ENV_BLAS: " /opt/libopenblas.so.0 ",
            config.ENV_SMALL_GEMM: "/k",
            config.ENV_GEMM_THREADS: "3",
            config.ENV_JIT_NATIVE: "off",
            config.ENV_QKERNELS: "0",
            config.ENV_SUBMIT_LAYERS: "0",
            config.ENV_BLAS_REEXEC: "1",
        }
    )
    assert s == CpuSettings(
        "/opt/libopenblas.so.0", True, Path("/k"), 3, False, False, submit_layers=0, reexec_child=True
    )


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "none"])
def test_small_gemm_off_is_not_a_cache_directory(value):
    s = CpuSettings.from_env({config.ENV_SMALL_GEMM: value, "XDG_CACHE_HOME": "/c"})
    assert not s.small_gemm and s.cache_dir == Path("/c/mlxserve")  # not ./off


@pytest.mark.parametrize("value", ["", "0", "-2", "x", "2.5"])
def test_cpu_settings_never_raise(value):
    """The bootstrap runs before anything can report an error: an unusable value is the default."""
    env = {name: value for name in (config.ENV_BLAS, config.ENV_GEMM_THREADS, config.ENV_JIT_NATIVE)}
    assert CpuSettings.from_env(env).gemm_threads is None
    submit = CpuSettings.from_env({config.ENV_SUBMIT_LAYERS: value}).submit_layers
    assert submit == (0 if value == "0" else config.SUBMIT_LAYERS)


def test_the_cpu_modules_read_cpu_settings(monkeypatch):
    from mlxserve.engine import cpu
    from mlxserve.engine.cpu import smallgemm

    monkeypatch.setenv(config.ENV_GEMM_THREADS, "3")
    assert smallgemm.threads() == 3 and cpu.threads() == (3, 1)
    monkeypatch.setenv(config.ENV_SMALL_GEMM, "false")
    assert smallgemm.unavailable_reason() == "MLXSERVE_SMALL_GEMM=off"


def test_dist_settings():
    assert DistSettings.from_env({}) == DistSettings(None, None, "auto", 30.0)
    env = {
        "MLXSERVE_DIST_BACKEND": "ring",
        "MLXSERVE_DIST_CONTROL": "10.0.0.1:5000",
        "MLXSERVE_DIST_SPLIT": "pipeline",
        "MLXSERVE_DIST_TIMEOUT": "2.5",
    }
    assert DistSettings.from_env(env) == DistSettings("ring", "10.0.0.1:5000", "pipeline", 2.5)
    s = Settings.from_env(env)
    assert s.dist == DistSettings.from_env(env) and s.cpu == CpuSettings.from_env(env)
    with pytest.raises(ValueError, match="MLXSERVE_DIST_TIMEOUT must be a number of seconds"):
        Settings.from_env({"MLXSERVE_DIST_TIMEOUT": "soon"})
