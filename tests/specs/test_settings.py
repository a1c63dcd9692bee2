"""Settings read from MLXSERVE_* variables: the admission window."""

from __future__ import annotations

import pytest

from mlxserve.config import AdmitWindow, Settings


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
