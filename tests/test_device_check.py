"""``scripts/device_check.py``, the one-shot GPU check, runs every part on the CPU (the code paths a GPU session
uses, so that it only has to run the script): agreement with the reference loop, speed, training, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_device_check_runs_every_part_on_the_cpu_and_prints_one_table(tmp_path, capsys):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import device_check
    finally:
        sys.path.remove(str(SCRIPTS))
    assert device_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "device_check.json").read_text())["rows"]
    assert [r["part"] for r in rows].count("agreement") == 6  # LSTM and GRU; C++ and Python loops; vector and set
    assert {r["part"] for r in rows} == {"agreement", "speed", "training", "resume"} and all(r["ok"] for r in rows)
    assert "| agreement | RIM gru, C++ loop, one vector vs CPU reference | ok |" in out
    assert "| agreement | RIM lstm, Python loop, a set of 3 vs CPU reference | ok |" in out
    assert (tmp_path / "device_check.md").read_text() in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_check.json", "device_check.md"]  # scratch removed


def test_the_core_benchmark_counts_the_kernels_of_a_step(capsys):
    sys.path.insert(0, str(SCRIPTS))
    try:
        from benchmark_core import kernel_counts
    finally:
        sys.path.remove(str(SCRIPTS))
    counts = kernel_counts()
    assert counts["RIM step"]["forward"] > counts["LSTMCell step"]["forward"] > 0
    assert counts["RIM sequence"]["backward"] > 0 and counts["LSTM sequence"]["forward"] < 1  # one fused op per call
    # the fused CPU kernels replace ATen operators (ATen only: what a GPU runs), forward and backward
    for name in ("RIM step", "RIM sequence"):
        for part in ("forward", "backward"):
            assert counts[name][part] < counts[f"{name}, ATen"][part]
    assert "kernels per step (CPU profiler" in capsys.readouterr().out
