"""Checkpoints that continue a run where it stopped: what they hold, how they are written, how they are checked.

A checkpoint is a directory ``run_dir/checkpoints/ckpt_<steps>_steps/``:

=================  =================================================================================================
``model.zip``      the algorithm as SB3 saves it: policy and optimizer state, env-step and update counters, the
                   learning-rate and clip-range schedules (their progress follows the env-step counter), the last
                   observation and episode starts, the episode-statistics window; ``RecurrentPPO.load`` reads it
``state.pkl``      what SB3 does not save: the recurrent state of the running episodes, the RNG states (Python,
                   NumPy, torch, CUDA), the vectorised env (every sub-env with its own RNG, the normaliser statistics)
                   when it can be pickled, the logger's pending values, the callbacks' state (evaluation history),
                   the W&B run id
``MANIFEST.json``  format version, env step, and the size and SHA-256 of both files; written last
=================  =================================================================================================

Writing is atomic: the files go to a hidden temporary directory, are flushed to disk, and the directory is renamed
into place, so a crash at any moment leaves either the whole checkpoint or none. A checkpoint whose files do not
match its manifest is *damaged*; :func:`latest_checkpoint` skips it (and says so) and falls back to the previous
one. Only the newest ``keep`` checkpoints are kept.

Checkpoints are taken at rollout boundaries (after a PPO update, before the next rollout), the one point where the
whole training state is the handful of things above. A run resumed from one replays the uninterrupted run exactly
when the env state could be saved and the same device and thread count are used. The env state is saved for SB3's
``DummyVecEnv`` of envs that pickle with their state: the classic-control family, and the gymnasium-wrapper Atari
path (``vec_env: dummy``) on ``NoFrameskip-v4`` ids, whose emulators are saved with ale-py's ``clone_state``. It is
not saved for ale-py's native vector env (the default Atari path), ``SubprocVecEnv``, ``ALE/*-v5`` ids (sticky
actions repeat a previous action the emulator state leaves out) and other ``EzPickle`` envs (MuJoCo, Box2D), which
pickle as a fresh copy. For those the episodes running at the checkpoint restart from a reset (seeded from the
run's seed and the env step, see :func:`resume_seed`), and everything else continues exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import torch as th
from gymnasium.utils import EzPickle
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "RunInUse",
    "RunLock",
    "capture_env",
    "capture_rng",
    "find_checkpoints",
    "latest_checkpoint",
    "restore_env",
    "restore_rng",
    "resume_seed",
    "to_device",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout; a checkpoint of another format is refused, never misread."""

_NAME = re.compile(r"^ckpt_(\d+)_steps$")
_MODEL, _STATE, _MANIFEST = "model.zip", "state.pkl", "MANIFEST.json"
_NOT_IN_ZIP = ["_last_lstm_states"]  # device tensors: kept in state.pkl on the CPU, so a run may resume elsewhere


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint directory (not yet verified: see :meth:`problem`)."""

    path: Path
    timesteps: int

    @property
    def model_file(self) -> Path:
        return self.path / _MODEL

    @property
    def state_file(self) -> Path:
        return self.path / _STATE

    def problem(self) -> str | None:
        """None if the checkpoint is whole, else what is wrong with it (one phrase)."""
        try:
            manifest = json.loads((self.path / _MANIFEST).read_text())
        except FileNotFoundError:
            return "no manifest"
        except (OSError, ValueError):
            return "unreadable manifest"
        if manifest.get("format") != CHECKPOINT_FORMAT:
            return f"checkpoint format {manifest.get('format')!r}, this version reads {CHECKPOINT_FORMAT}"
        for name, expected in manifest.get("files", {}).items():
            path = self.path / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
                return f"{name} does not match its manifest"
        if set(manifest.get("files", {})) != {_MODEL, _STATE}:
            return "incomplete manifest"
        return None

    def load_state(self) -> dict[str, Any]:
        with open(self.state_file, "rb") as f:
            return pickle.load(f)


def find_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The checkpoint directories of a run, oldest first (whole or not)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for path in root.glob("ckpt_*_steps") if root.is_dir() else ():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append(Checkpoint(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.timesteps)


def latest_checkpoint(run_dir: Path) -> tuple[Checkpoint | None, list[tuple[Checkpoint, str]]]:
    """The newest whole checkpoint, and the newer damaged ones skipped on the way (with what is wrong)."""
    skipped = []
    for ckpt in reversed(find_checkpoints(run_dir)):
        problem = ckpt.problem()
        if problem is None:
            return ckpt, skipped
        skipped.append((ckpt, problem))
    return None, skipped


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_checkpoint(
    run_dir: Path, model: BaseAlgorithm, state: dict[str, Any], *, keep: int, version: str
) -> Checkpoint:
    """Write a checkpoint of ``model`` and ``state`` at ``model.num_timesteps`` atomically; keep the newest ``keep``.

    ``state`` is pickled as given (see the module docstring for what the training loop puts there); the
    recurrent state ``model._last_lstm_states`` is added to it on the CPU.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    steps = int(model.num_timesteps)
    final = root / f"ckpt_{steps}_steps"
    tmp = root / f".tmp-ckpt_{steps}_steps-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lstm_states = getattr(model, "_last_lstm_states", None)
    state = dict(state, lstm_states=to_device(lstm_states, th.device("cpu")))
    model.save(tmp / _MODEL, exclude=_NOT_IN_ZIP)
    with open(tmp / _STATE, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    files = {}
    for name in (_MODEL, _STATE):
        _fsync(tmp / name)
        files[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "timesteps": steps,
        "rims_rl_version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(tmp / _MANIFEST)
    if final.exists():  # the same step saved again (e.g. an interrupt right after a periodic checkpoint)
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(root)
    _prune(root, keep)
    return Checkpoint(final, steps)


def _prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints with a manifest (older ones without go too) and leftovers of
    writers that died. (Only a resume verifies the files: hashing every kept checkpoint at each write is waste.)"""
    checkpoints = find_checkpoints(root.parent)
    whole = [c for c in checkpoints if (c.path / _MANIFEST).is_file()]
    kept = {c.path for c in whole[-keep:]}
    oldest_kept = min((c.timesteps for c in whole[-keep:]), default=None)
    for ckpt in checkpoints:
        if ckpt.path not in kept and (oldest_kept is None or ckpt.timesteps < oldest_kept):
            shutil.rmtree(ckpt.path, ignore_errors=True)
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        if not leftover.name.endswith(f"-{os.getpid()}"):
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                pid = int(leftover.name.rsplit("-", 1)[1])
                os.kill(pid, 0)  # the writer is alive: leave its directory alone
                continue
            shutil.rmtree(leftover, ignore_errors=True)


def to_device(value: Any, device: th.device) -> Any:
    """``value`` (tensors, possibly nested in tuples) moved to ``device``."""
    if isinstance(value, th.Tensor):
        return value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple (sb3-contrib's RNNStates)
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


# ----------------------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The global RNG states that training draws from (Python, NumPy, torch CPU and every CUDA device)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": th.get_rng_state()}
    if th.cuda.is_available() and th.cuda.is_initialized():
        state["cuda"] = th.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    th.set_rng_state(state["torch"])
    if "cuda" in state and th.cuda.is_available() and len(state["cuda"]) == th.cuda.device_count():
        th.cuda.set_rng_state_all(state["cuda"])


def _layers(venv: VecEnv) -> tuple[list[VecEnvWrapper], VecEnv]:
    wrappers = []
    while isinstance(venv, VecEnvWrapper):
        wrappers.append(venv)
        venv = venv.venv
    return wrappers, venv


def capture_env(venv: VecEnv) -> dict[str, Any]:
    """The state of a vectorised env: each VecEnv wrapper's attributes (``VecNormalize`` statistics, frame stacks),
    and the whole base env when it is a ``DummyVecEnv`` whose envs pickle with their state (``base`` is None
    otherwise: other VecEnvs, and envs that pickle as a fresh copy, like gymnasium's MuJoCo envs)."""
    wrappers, base = _layers(venv)
    layers = []
    for wrapper in wrappers:
        attrs = {k: v for k, v in vars(wrapper).items() if k not in ("venv", "class_attributes")}
        try:
            layers.append(cloudpickle.dumps(attrs))
        except Exception:
            layers.append(None)
    base_state = None
    if isinstance(base, DummyVecEnv) and all(_capturable(env) for env in base.envs):
        try:
            base_state = cloudpickle.dumps(
                {"attrs": vars(base), "ale": {i: _ale_state(env) for i, env in enumerate(base.envs) if _is_ale(env)}}
            )
        except Exception as err:
            log.debug("env state of %s not picklable: %s", type(base).__name__, err)
    return {"kinds": [type(w).__name__ for w in wrappers] + [type(base).__name__], "layers": layers, "base": base_state}


def restore_env(venv: VecEnv, state: dict[str, Any]) -> bool:
    """Put ``state`` (from :func:`capture_env`) back into an env built the same way; True if the base env itself
    was restored (the running episodes continue), False if the caller must reset it."""
    wrappers, base = _layers(venv)
    kinds = [type(w).__name__ for w in wrappers] + [type(base).__name__]
    if kinds != state["kinds"]:
        raise ValueError(f"the env is built as {' > '.join(kinds)}, the checkpoint's as {' > '.join(state['kinds'])}")
    for wrapper, blob in zip(wrappers, state["layers"], strict=True):
        if blob is not None:
            vars(wrapper).update(pickle.loads(blob))
    if state["base"] is None:
        return False
    data = pickle.loads(state["base"])
    base.close()
    vars(base).update(data["attrs"])
    for i, (attrs, emulator) in data["ale"].items():
        vars(base.envs[i].unwrapped).update(attrs)
        base.envs[i].unwrapped.restore_state(emulator)
    return True


# gymnasium's EzPickle envs (Atari, MuJoCo, Box2D) pickle as their constructor call: unpickled, they are new envs.
# ale-py's is captured by hand (its attributes, and the emulator with its RNG) unless it has sticky actions (the
# emulator state leaves out the previous action they repeat); the others are not captured.
def _capturable(env: Any) -> bool:
    if _is_ale(env):
        return env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    return not isinstance(env.unwrapped, EzPickle)


def _is_ale(env: Any) -> bool:
    return type(env.unwrapped).__module__.startswith("ale_py") and hasattr(env.unwrapped, "clone_state")


def _ale_state(env: Any) -> tuple[dict[str, Any], Any]:
    unwrapped = env.unwrapped
    return {k: v for k, v in vars(unwrapped).items() if k != "ale"}, unwrapped.clone_state(include_rng=True)


def resume_seed(seed: int, timesteps: int) -> int:
    """The seed for an env that is reset at a resume: distinct from the run's initial seeds and evaluation seeds."""
    return int(np.random.SeedSequence([seed, timesteps]).generate_state(1)[0] % (2**31 - 1))


# ----------------------------------------------------------------------------------------------------------------
class RunInUse(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory (``.lock``, released by the OS when the process dies, even killed)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._file: Any = None

    def acquire(self) -> RunLock:
        self._file = self._lock(self.path)
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"pid {os.getpid()}")
            self._file.flush()
        return self

    @staticmethod
    def _lock(path: Path) -> Any:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return None
        file = open(path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunInUse(f"run directory {path.parent} is in use by {holder}") from None
        return file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @classmethod
    def check(cls, run_dir: Path) -> None:
        """Raise :class:`RunInUse` if a live process holds ``run_dir`` (writes nothing)."""
        path = Path(run_dir) / ".lock"
        if path.exists():
            file = cls._lock(path)
            if file is not None:
                file.close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
