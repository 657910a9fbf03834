"""The state-based expert behind the imitation experiment (App. C.7): SAC from stable-baselines3 on ``HalfCheetah-v5``.

``rims-rl expert --env HalfCheetah-v5 --total-timesteps N`` trains one into a run directory:

=====================  ===============================================================================
``model.zip``          the whole SAC model at the end (``SAC.load``), for further training
``checkpoint.zip``     the newest periodic checkpoint, with ``replay_buffer.pkl`` beside it (``--resume``)
``expert.pt``          the policy alone: SB3's SAC ``Actor`` (``load_expert``), the file that is shipped
``evaluations.npz``    periodic deterministic evaluations (SB3's EvalCallback format)
``expert.json``        the settings, the env steps done and the final evaluation (mean/std return)
``progress.csv``       SB3's logged scalars
=====================  ===============================================================================

Hyperparameters are rl-baselines3-zoo's for HalfCheetah (SB3's SAC defaults, ``learning_starts`` 10,000). A
Ctrl-C or SIGTERM saves the model and a checkpoint before exiting; ``--resume RUN_DIR`` continues from the newest
checkpoint (model, optimizers, replay buffer, step counter).

The repository ships ``experts/HalfCheetah-v5.pt`` (the actor only) with its measured return in
``experts/HalfCheetah-v5.json``; :func:`load_expert` reads either that or a run directory.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback, ProgressBarCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.sac.policies import Actor

# rl-baselines3-zoo, hyperparams/sac.yml, HalfCheetah: SAC's defaults with 10k random steps first.
ZOO_SAC = {"learning_starts": 10_000}


@dataclass
class ExpertSettings:
    env: str = "HalfCheetah-v5"
    total_timesteps: int = 300_000
    seed: int = 0
    device: str = "auto"
    eval_freq: int = 10_000
    eval_episodes: int = 5
    checkpoint_every: int = 25_000


class _Stop:
    """First SIGINT/SIGTERM: stop after the current step (the model and a checkpoint are saved); second: at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


class _Checkpoints(BaseCallback):
    def __init__(self, run_dir: Path, every: int, stop: _Stop) -> None:
        super().__init__()
        self.run_dir, self.every, self.stop = run_dir, every, stop

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            save_checkpoint(self.model, self.run_dir)
        return not self.stop.requested


class _Evaluations(EvalCallback):
    """SB3's EvalCallback on the run's env-step count (every ``eval_freq`` steps of the whole run, resumed or not),
    continuing the history already in ``evaluations.npz``."""

    def __init__(self, eval_env: gym.Env, run_dir: Path, **kwargs: Any) -> None:
        super().__init__(eval_env, log_path=str(run_dir), best_model_save_path=None, verbose=0, **kwargs)
        previous = run_dir / "evaluations.npz"
        if previous.is_file():
            with np.load(previous) as data:
                self.evaluations_timesteps = [int(t) for t in data["timesteps"]]
                self.evaluations_results = [list(r) for r in data["results"]]
                self.evaluations_length = [list(r) for r in data["ep_lengths"]]

    def _on_step(self) -> bool:
        if self.eval_freq > 0 and self.num_timesteps % self.eval_freq == 0:
            self.n_calls = self.eval_freq  # make the parent's "every eval_freq calls" test pass on this step
            return super()._on_step()
        self.n_calls = 0
        return True


def save_checkpoint(model: SAC, run_dir: Path) -> None:
    """The whole model and its replay buffer, written beside and then renamed over the previous checkpoint."""
    tmp = run_dir / "checkpoint.tmp.zip"
    model.save(tmp)
    model.save_replay_buffer(run_dir / "replay_buffer.tmp.pkl")
    (run_dir / "replay_buffer.tmp.pkl").replace(run_dir / "replay_buffer.pkl")
    tmp.replace(run_dir / "checkpoint.zip")


def _env(env_id: str, seed: int) -> gym.Env:
    env = Monitor(gym.make(env_id))
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def train_expert(settings: ExpertSettings, run_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train (or, with ``resume``, continue) SAC into ``run_dir``; returns the summary written to expert.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = _env(settings.env, settings.seed)
    eval_env = _env(settings.env, settings.seed + 10_000)
    if resume:
        model = SAC.load(run_dir / "checkpoint.zip", env=env, device=settings.device)
        model.load_replay_buffer(run_dir / "replay_buffer.pkl")
    else:
        buffer_size = min(1_000_000, settings.total_timesteps)  # SB3 preallocates it: 1M steps is ~300 MB
        model = SAC(
            "MlpPolicy", env, buffer_size=buffer_size, seed=settings.seed, device=settings.device, verbose=0, **ZOO_SAC
        )
    model.set_logger(configure(str(run_dir), ["csv"]))
    start = time.perf_counter()
    done_before = model.num_timesteps
    with _Stop() as stop:
        callbacks: list[BaseCallback] = [
            _Checkpoints(run_dir, settings.checkpoint_every, stop),
            _Evaluations(
                eval_env,
                run_dir,
                n_eval_episodes=settings.eval_episodes,
                eval_freq=settings.eval_freq,
                deterministic=True,
            ),
        ]
        if progress:
            callbacks.append(ProgressBarCallback())
        try:
            model.learn(
                settings.total_timesteps - done_before,
                callback=CallbackList(callbacks),
                reset_num_timesteps=not resume,
            )
        finally:
            save_checkpoint(model, run_dir)
            model.save(run_dir / "model.zip", exclude=["replay_buffer"])
            model.policy.actor.save(str(run_dir / "expert.pt"))
        interrupted = stop.requested
    seconds = time.perf_counter() - start
    returns = evaluate_expert(model.policy.actor, settings.env, episodes=10, seed=settings.seed + 20_000)
    summary = {
        "settings": asdict(settings),
        "timesteps": int(model.num_timesteps),
        "finished": not interrupted and model.num_timesteps >= settings.total_timesteps,
        "steps_per_second": (model.num_timesteps - done_before) / max(seconds, 1e-9),
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "episodes": len(returns),
        "returns": [float(r) for r in returns],
    }
    (run_dir / "expert.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_expert(path: str | Path, device: str = "cpu") -> Actor:
    """The expert's actor from a ``.pt`` file or a run directory (its ``expert.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "expert.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no expert at {path} (a .pt file from `rims-rl expert` or its run directory)")
    actor = Actor.load(str(path), device=device)
    actor.set_training_mode(False)
    return actor


def evaluate_expert(actor: Actor, env_id: str, *, episodes: int, seed: int) -> list[float]:
    """Full deterministic episodes of the actor on the state-based env (true state in)."""
    env = gym.make(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            with th.no_grad():
                action, _ = actor.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns
