"""The training procedure behind ``rims-rl train``: config in, run directory out.

A run directory holds everything a report needs, with no network:

=====================  ===============================================================================
``config.yaml``        the resolved configuration (every key, defaults included)
``run.json``           metadata: project version, status (running/finished/interrupted/failed), steps, W&B run
``progress.csv``       SB3's logged scalars, one row per rollout (``time/total_timesteps`` is the env step)
``checkpoints/``       periodic checkpoints ``model_<steps>_steps.zip`` (``checkpoint_freq``) and, after an
                       interrupt, ``interrupted_<steps>_steps.zip``
``evaluations.npz``    periodic evaluations (``eval.freq``), SB3's EvalCallback format
``model.zip``          the final model (``RecurrentPPO.load``)
``eval.json``          the final evaluation on env seeds disjoint from training
``wandb/``             the W&B run (offline unless ``wandb.mode: online``)
=====================  ===============================================================================
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gymnasium as gym
import yaml
from gymnasium import spaces
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.logger import CSVOutputFormat, Logger
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv, VecNormalize
from torch import nn

from agents.evaluation import EVAL_N_ENVS, EVAL_SEED_OFFSET, EvalResult, evaluate
from agents.ppo import RecurrentPPO
from envs import AtariSettings, make_env
from rims_rl import __version__
from rims_rl.config import TrainConfig
from rims_rl.tracking import RIMActivationCallback, WandbOutputFormat, start_wandb

__all__ = [
    "ConfigRejected",
    "Prepared",
    "TrainResult",
    "TrainingInterrupted",
    "atari_settings",
    "build_model",
    "policy_kwargs",
    "policy_name",
    "prepare",
    "train",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


@dataclass
class TrainResult:
    run_dir: Path
    timesteps: int
    seconds: float
    final_eval: EvalResult | None

    @property
    def steps_per_second(self) -> float:
        return self.timesteps / self.seconds if self.seconds > 0 else 0.0


class ConfigRejected(ValueError):
    """The env or the model could not be built from the configuration (one line: what and why)."""


@dataclass
class Prepared:
    """What :func:`prepare` built: the training env and the model, nothing written yet."""

    env: VecEnv
    model: RecurrentPPO


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C; a checkpoint of the model at that point was saved."""

    def __init__(self, run_dir: Path, checkpoint: Path, timesteps: int) -> None:
        super().__init__(f"interrupted at {timesteps} steps; checkpoint saved to {checkpoint}")
        self.run_dir, self.checkpoint, self.timesteps = run_dir, checkpoint, timesteps


def policy_name(cfg: TrainConfig, observation_space: spaces.Space) -> str:
    """The policy alias for the configured core and the observation space (Mlp, Cnn or MultiInput)."""
    if isinstance(observation_space, spaces.Dict):
        kind = "MultiInput"
    elif is_image_space(observation_space, check_channels=False):
        kind = "Cnn"
    else:
        kind = "Mlp"
    if cfg.policy == "rims":
        return {"Mlp": "RIMPolicy", "Cnn": "RIMCnnPolicy", "MultiInput": "RIMMultiInputPolicy"}[kind]
    return f"{kind}LstmPolicy"


def policy_kwargs(cfg: TrainConfig, observation_space: spaces.Space) -> dict[str, Any]:
    """Policy keyword arguments from the config: the same heads and extractor for RIM and LSTM."""
    net = cfg.network
    kwargs: dict[str, Any] = dict(
        net_arch=net.net_arch,
        activation_fn=_ACTIVATIONS[net.activation_fn],
        ortho_init=net.ortho_init,
        share_features_extractor=net.share_features_extractor,
        log_std_init=net.log_std_init,
        optimizer_kwargs=dict(eps=cfg.ppo.adam_eps),
    )
    critic = net.recurrent_critic
    shared, separate, grad = critic in ("shared", "shared_detached"), critic == "separate", critic == "shared"
    if cfg.policy == "rims":
        rim = cfg.rim
        kwargs.update(
            num_units=rim.num_units,
            unit_size=rim.unit_size,
            k_active=rim.k_active,
            cell=rim.cell,
            rim_kwargs=rim.rim_kwargs(),
            shared_rim=shared,
            enable_critic_rim=separate,
            shared_critic_grad=grad,
        )
        if policy_name(cfg, observation_space) == "RIMCnnPolicy":
            kwargs["input_set"] = rim.input_set
    else:
        kwargs.update(
            lstm_hidden_size=cfg.lstm.hidden_size,
            shared_lstm=shared,
            enable_critic_lstm=separate,
            shared_critic_grad=grad,
        )
    return kwargs


def atari_settings(cfg: TrainConfig) -> AtariSettings:
    """The Atari preprocessing of ``cfg`` (used only for Atari envs)."""
    return AtariSettings(**cfg.atari.model_dump())


def _schedule(value: float, kind: str) -> float | LinearSchedule:
    return LinearSchedule(value, 0.0, 1.0) if kind == "linear" else value


def build_model(cfg: TrainConfig, env: Any) -> RecurrentPPO:
    """The RecurrentPPO model for ``cfg`` on a vectorised ``env``."""
    ppo = cfg.ppo
    return RecurrentPPO(
        policy_name(cfg, env.observation_space),
        env,
        learning_rate=_schedule(ppo.learning_rate, ppo.lr_schedule),
        n_steps=ppo.n_steps,
        batch_size=ppo.batch_size,
        n_epochs=ppo.n_epochs,
        gamma=ppo.gamma,
        gae_lambda=ppo.gae_lambda,
        clip_range=_schedule(ppo.clip_range, ppo.clip_range_schedule),
        ent_coef=ppo.ent_coef,
        vf_coef=ppo.vf_coef,
        max_grad_norm=ppo.max_grad_norm,
        normalize_advantage=ppo.normalize_advantage,
        target_kl=ppo.target_kl,
        use_sde=ppo.use_sde,
        sde_sample_freq=ppo.sde_sample_freq,
        policy_kwargs=policy_kwargs(cfg, env.observation_space),
        seed=cfg.seed,
        device=cfg.device,
        verbose=0,
    )


def prepare(cfg: TrainConfig) -> Prepared:
    """Build the training env and the model for ``cfg``, writing nothing.

    :raises ConfigRejected: when the env cannot be made (e.g. a missing optional dependency) or SB3 rejects the
        settings (e.g. ``ppo.use_sde`` with discrete actions).
    """
    try:
        env = make_env(
            cfg.env, n_envs=cfg.n_envs, seed=cfg.seed, vec_env=cfg.vec_env, efference_copy=cfg.efference_copy,
            atari=atari_settings(cfg),
        )  # fmt: skip
    except (gym.error.Error, ValueError) as err:
        raise ConfigRejected(f"cannot make env {cfg.env}: {str(err).splitlines()[0]}") from None
    if cfg.normalize_reward:  # observations untouched, so the policy needs no statistics at evaluation
        env = VecNormalize(env, norm_obs=False, norm_reward=True, gamma=cfg.ppo.gamma)
    try:
        model = build_model(cfg, env)
    except (ValueError, AssertionError, TypeError) as err:
        env.close()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigRejected(f"the model cannot be built with this configuration: {first}") from None
    return Prepared(env, model)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def train(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    progress_bar: bool = False,
    callbacks: list[BaseCallback] | None = None,
    prepared: Prepared | None = None,
) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (created; it should be new or empty) and evaluate the final model.

    :param prepared: the env and model from :func:`prepare` (built here if None).
    :raises ConfigRejected: before anything is written, if the env or model cannot be built.
    :raises TrainingInterrupted: on Ctrl-C, after saving a checkpoint and closing the W&B run.
    """
    prepared = prepared or prepare(cfg)
    env, model = prepared.env, prepared.model
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    meta: dict[str, Any] = {
        "rims_rl_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "env": cfg.env,
        "policy": cfg.policy,
        "algo": cfg.algo,
        "seed": cfg.seed,
        "timesteps": 0,
    }
    _write_json(run_dir / "run.json", meta)

    wandb_run = start_wandb(
        cfg.wandb.mode,
        run_dir,
        cfg.model_dump(),
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group or cfg.env,
        job_type=cfg.policy,
        tags=[cfg.policy, cfg.algo, *cfg.wandb.tags],
        name=run_dir.name,
    )
    if wandb_run is not None:
        meta["wandb"] = {"mode": cfg.wandb.mode, "id": wandb_run.id, "dir": str(Path(wandb_run.dir).parent)}
        _write_json(run_dir / "run.json", meta)
    outputs = [CSVOutputFormat(str(run_dir / "progress.csv"))]
    if wandb_run is not None:
        outputs.append(WandbOutputFormat(wandb_run))
    model.set_logger(Logger(str(run_dir), outputs))

    cb: list[BaseCallback] = []
    if cfg.checkpoint_freq > 0:
        cb.append(
            CheckpointCallback(
                save_freq=max(cfg.checkpoint_freq // cfg.n_envs, 1),
                save_path=str(run_dir / "checkpoints"),
                name_prefix="model",
            )
        )
    if cfg.policy == "rims":
        cb.append(RIMActivationCallback())
    eval_env = None
    if cfg.eval.freq > 0:
        eval_env = make_env(
            cfg.env,
            n_envs=min(cfg.eval.episodes, EVAL_N_ENVS),
            seed=cfg.seed + EVAL_SEED_OFFSET,
            efference_copy=cfg.efference_copy,
            atari=atari_settings(cfg).full_games(),
        )
        if cfg.normalize_reward:  # EvalCallback syncs statistics between identically wrapped envs
            eval_env = VecNormalize(eval_env, norm_obs=False, norm_reward=False, training=False)
        stop = StopTrainingOnRewardThreshold(cfg.eval.stop_at, verbose=0) if cfg.eval.stop_at is not None else None
        cb.append(
            EvalCallback(
                eval_env,
                n_eval_episodes=cfg.eval.episodes,
                eval_freq=max(cfg.eval.freq // cfg.n_envs, 1),
                deterministic=cfg.eval.deterministic,
                log_path=str(run_dir),
                callback_on_new_best=stop,
                warn=False,
                verbose=0,
            )
        )
    cb += callbacks or []

    start = time.perf_counter()
    try:
        model.learn(cfg.total_timesteps, callback=CallbackList(cb), progress_bar=progress_bar)
    except KeyboardInterrupt:
        checkpoint = run_dir / "checkpoints" / f"interrupted_{model.num_timesteps}_steps.zip"
        checkpoint.parent.mkdir(exist_ok=True)
        model.save(checkpoint)
        meta.update(status="interrupted", timesteps=model.num_timesteps)
        _write_json(run_dir / "run.json", meta)
        if wandb_run is not None:
            wandb_run.finish(exit_code=130)
        raise TrainingInterrupted(run_dir, checkpoint, model.num_timesteps) from None
    except BaseException as err:  # a crash: the run directory says so, and the W&B run is closed
        meta.update(status="failed", timesteps=model.num_timesteps, error=f"{type(err).__name__}: {err}"[:500])
        _write_json(run_dir / "run.json", meta)
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    finally:
        env.close()
        if eval_env is not None:
            eval_env.close()
    seconds = time.perf_counter() - start
    model.save(run_dir / "model.zip")

    result = evaluate(
        model, cfg.env, episodes=cfg.eval.episodes, deterministic=cfg.eval.deterministic,
        seed=cfg.seed + EVAL_SEED_OFFSET, efference_copy=cfg.efference_copy, atari=atari_settings(cfg),
    )  # fmt: skip
    _write_json(run_dir / "eval.json", result.to_dict())
    meta.update(status="finished", timesteps=model.num_timesteps, seconds=round(seconds, 2))
    _write_json(run_dir / "run.json", meta)
    if wandb_run is not None:
        wandb_run.summary.update({"eval/mean_return": result.mean_return, "eval/std_return": result.std_return})
        wandb_run.finish()
    return TrainResult(run_dir=run_dir, timesteps=model.num_timesteps, seconds=seconds, final_eval=result)
