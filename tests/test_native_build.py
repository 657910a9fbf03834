"""Building the RIM's C++ loop (``rims_rl.rim_fast._native``): where it is built, and that a build killed midway
does not hang every later process."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rims_rl.rim_fast

SOURCE = Path(rims_rl.rim_fast.__file__).with_name("csrc") / "rim_loop.cpp"


def test_build_directory_is_keyed_by_source_and_environment(monkeypatch, tmp_path):
    """Another virtual environment, another checkout of the source or an edit of it builds in a folder of its own
    (torch's default, one shared folder per extension name, made two checkouts rebuild after each other)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    here = rims_rl.rim_fast._build_directory(SOURCE)
    assert here == rims_rl.rim_fast._build_directory(SOURCE)  # stable
    assert here.parent == tmp_path / "ext" / "rims_rl" and here.is_dir()

    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    other_env = rims_rl.rim_fast._build_directory(SOURCE)
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))

    copy = tmp_path / "checkout" / "rim_loop.cpp"
    copy.parent.mkdir()
    copy.write_bytes(SOURCE.read_bytes())
    other_checkout = rims_rl.rim_fast._build_directory(copy)
    copy.write_text(SOURCE.read_text() + "\n// edited\n")
    edited = rims_rl.rim_fast._build_directory(copy)
    assert len({here, other_env, other_checkout, edited}) == 4


@pytest.mark.skipif(os.environ.get("RIMS_RL_NATIVE", "1") == "0", reason="RIMS_RL_NATIVE=0: the C++ loop is off")
def test_lock_left_by_a_killed_build_is_cleared():
    """torch marks a build in progress with a ``lock`` file and waits while it exists; a process killed while it
    compiled left it, and every later RIM user waited forever in ``cpp_extension.load``. Here the lock of a killed
    build is put in the real build folder (under the build's ``flock``, so no live build in another test worker is
    caught by it); a fresh process must still load the loop, with a warning, and leave no lock behind."""
    build = rims_rl.rim_fast._build_directory(SOURCE)
    with open(build / "build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (build / "lock").touch()
        fcntl.flock(handle, fcntl.LOCK_UN)
    code = "import rims_rl.rim_fast as f; f.NATIVE_LOOP = True; assert f._native() is not None; print('loaded')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded" in done.stdout
    assert "left by a build of the RIM's C++ loop that was killed" in done.stderr
    assert not (build / "lock").exists()


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False), (None, False)])
def test_rims_rl_fused_switches_the_fused_kernels_on(value, expected):
    """``RIMS_RL_FUSED=1`` turns the C++ loop's fused CPU kernels on for a whole process (the ``rims-rl`` command);
    unset or 0 keeps the default, off."""
    env = {k: v for k, v in os.environ.items() if k != "RIMS_RL_FUSED"}
    if value is not None:
        env["RIMS_RL_FUSED"] = value
    code = "import rims_rl.rim_fast as f; print(f.FUSED_KERNELS)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(expected)
