"""The training procedure behind ``rims-rl train``: config in, run directory out; and resuming a stopped run.

A run directory holds everything a report needs, with no network:

=====================  ===============================================================================
``config.yaml``        the resolved configuration (every key, defaults included)
``run.json``           metadata: project version, status (running/finished/interrupted/failed), env steps, newest
                       checkpoint, W&B run id, and one entry per resume
``progress.csv``       SB3's logged scalars, one row per rollout (``time/total_timesteps`` is the env step)
``checkpoints/``       ``ckpt_<steps>_steps/``: periodic (``checkpoint.every_steps`` / ``every_minutes``), on
                       SIGINT/SIGTERM, and final; the newest ``checkpoint.keep`` (``agents/checkpoints.py``)
``evaluations.npz``    periodic evaluations (``eval.freq``), SB3's EvalCallback format
``model.zip``          the final model (``RecurrentPPO.load`` or ``RecurrentA2C.load``, as ``algo``)
``vecnormalize.pkl``   with ``normalize_obs``: the observation statistics the model expects (``VecNormalize.load``)
``eval.json``          the final evaluation on env seeds disjoint from training
``wandb/``             the W&B run (offline unless ``wandb.mode: online``)
``activations/``       every step's RIM masks every ``activations.save_every`` rollouts (``read_activations``)
``.lock``              held while a process trains into the directory
=====================  ===============================================================================

:func:`train` starts a run; :func:`resume` continues one from its newest whole checkpoint: the model, optimizer,
schedules, counters, RNG states, env state (where it can be saved), evaluation history, pending log values and W&B
run all continue, and ``progress.csv`` is cut back to the checkpoint's step so no row is duplicated or missing. On
CPU, with the same thread count, a resumed classic-control run reproduces the uninterrupted run's metrics exactly.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gymnasium as gym
import yaml
from gymnasium import spaces
from pydantic import ValidationError
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    ProgressBarCallback,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.logger import CSVOutputFormat, Logger
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from rims_rl import __version__
from rims_rl.agents.callbacks import (
    GracefulStop,
    RunCheckpointCallback,
    SeededEvalCallback,
    StopForCheckpoint,
    TrainingDiverged,
    is_divergence_error,
    nonfinite_parameter,
)
from rims_rl.agents.checkpoints import (
    Checkpoint,
    RunInUse,
    RunLock,
    capture_env,
    capture_rng,
    latest_checkpoint,
    restore_env,
    restore_rng,
    resume_seed,
    to_device,
    write_checkpoint,
)
from rims_rl.agents.evaluation import EVAL_N_ENVS, EVAL_SEED_OFFSET, EvalResult, evaluate
from rims_rl.agents.normalization import ObsStats, check_normalizable, find_normalizer, normalize, write_stats
from rims_rl.agents.ppo import RecurrentPPO
from rims_rl.agents.recurrent_a2c import RecurrentA2C
from rims_rl.agents.sizes import ResourceError, check_env_count, check_memory
from rims_rl.agents.spaces import extractor_choice, grid_mission
from rims_rl.agents.transfer import TransferError, freeze, load_source_weights
from rims_rl.config import TrainConfig
from rims_rl.envs import AtariSettings, UnsupportedSpaceError, make_env
from rims_rl.extractors import GridMissionExtractor, SmallImageCNN
from rims_rl.tracking import ACTIVATIONS_DIR, RIMActivationCallback, WandbOutputFormat, finish_wandb, start_wandb

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ConfigRejected",
    "Prepared",
    "ResumableCSVOutputFormat",
    "RunRejected",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "atari_settings",
    "build_model",
    "load_run",
    "make_train_env",
    "policy_kwargs",
    "policy_name",
    "prepare",
    "resume",
    "train",
]

log = logging.getLogger(__name__)

Algorithm = RecurrentPPO | RecurrentA2C
ALGORITHMS: dict[str, type[RecurrentPPO] | type[RecurrentA2C]] = {"ppo": RecurrentPPO, "a2c": RecurrentA2C}
"""``algo`` in the config -> the algorithm class (whose ``load`` reads that run's model files)."""

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


@dataclass
class TrainResult:
    run_dir: Path
    timesteps: int
    seconds: float
    final_eval: EvalResult | None
    resumed_from: int | None = None
    """The env step the run resumed from (None for a run trained in one go)."""

    @property
    def steps_per_second(self) -> float:
        trained = self.timesteps - (self.resumed_from or 0)
        return trained / self.seconds if self.seconds > 0 else 0.0


class ConfigRejected(ValueError):
    """The env or the model could not be built from the configuration (one line: what and why)."""


class RunRejected(ValueError):
    """A run directory cannot be resumed (one line: what and why); nothing in it was changed."""


@dataclass
class Prepared:
    """What :func:`prepare` built: the training env and the model, nothing written yet."""

    env: VecEnv
    model: Algorithm


class TrainingInterrupted(Exception):
    """Training stopped by a signal (SIGINT/SIGTERM); ``checkpoint`` is the newest one to resume from (or None)."""

    def __init__(self, run_dir: Path, checkpoint: Path | None, timesteps: int, signal_name: str = "") -> None:
        by = f" by {signal_name}" if signal_name else ""
        saved = f"checkpoint {checkpoint.name}" if checkpoint is not None else "no checkpoint yet"
        super().__init__(f"interrupted{by} at step {timesteps}; {saved}")
        self.run_dir, self.checkpoint, self.timesteps, self.signal_name = run_dir, checkpoint, timesteps, signal_name


class ResumableCSVOutputFormat(CSVOutputFormat):
    """SB3's CSV writer, continuing an existing file when ``keep_until`` is given: rows logged after that env step
    (by a process that died after its last checkpoint) are dropped first, so the file has no duplicate step."""

    def __init__(self, filename: str | Path, keep_until: int | None = None) -> None:
        path = Path(filename)
        rows = []
        if keep_until is not None and path.is_file():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        if not rows or "time/total_timesteps" not in rows[0]:
            super().__init__(str(path))
            return
        header, column = rows[0], rows[0].index("time/total_timesteps")
        kept = [r for r in rows[1:] if len(r) == len(header) and r[column] and int(float(r[column])) <= keep_until]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([header, *kept])
        tmp.replace(path)
        self.file = open(path, "r+")
        self.file.seek(0, 2)
        self.keys = list(header)
        self.separator = ","
        self.quotechar = '"'


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
    )
    if cfg.algo == "ppo":  # RecurrentA2C chooses its optimiser (RMSprop) itself
        kwargs["optimizer_kwargs"] = dict(eps=cfg.ppo.adam_eps)
    if grid_mission(observation_space):  # goal-conditioned grid views (BabyAI): the mission conditions the cells
        kwargs["features_extractor_class"] = GridMissionExtractor
    small_image = extractor_choice(observation_space) == "SmallImageCNN"
    if small_image and not (cfg.policy == "rims" and cfg.rim.input_set == "grid"):  # NatureCNN cannot take it
        kwargs["features_extractor_class"] = SmallImageCNN
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
        if grid_mission(observation_space):
            kwargs["features_extractor_kwargs"] = dict(input_set=rim.input_set)
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


LOG_EVERY_STEPS = 1024
"""A2C's rollouts are short (128 env steps on BabyAI): its metrics get a row (progress.csv, W&B) once every
``LOG_EVERY_STEPS`` env steps or so, not every rollout; SB3's A2C default (every 100 rollouts) would leave 12,800 steps
between rows. PPO logs every rollout (1,024 steps on Atari). The RIM activation statistics of a row are those of the
rollout that ends at its step."""


def log_interval(cfg: TrainConfig) -> int:
    """Rollouts between metric rows for ``cfg``'s algorithm (:data:`LOG_EVERY_STEPS`), counted over the whole run."""
    if cfg.algo == "ppo":
        return 1
    return max(1, round(LOG_EVERY_STEPS / (cfg.n_envs * cfg.a2c.n_steps)))


def _schedule(value: float, kind: str) -> float | LinearSchedule:
    return LinearSchedule(value, 0.0, 1.0) if kind == "linear" else value


def build_model(cfg: TrainConfig, env: Any) -> Algorithm:
    """The model of ``cfg.algo`` (RecurrentPPO or RecurrentA2C) for ``cfg`` on a vectorised ``env``.

    The ``ppo``/``a2c`` sections use the algorithms' own argument names; only the schedules and the Adam epsilon
    (a policy optimiser argument) are translated.
    """
    section = cfg.algo_settings
    kwargs = section.model_dump(exclude={"lr_schedule", "clip_range_schedule", "adam_eps"})
    kwargs["learning_rate"] = _schedule(section.learning_rate, section.lr_schedule)
    if cfg.algo == "ppo":
        kwargs["clip_range"] = _schedule(cfg.ppo.clip_range, cfg.ppo.clip_range_schedule)
    return ALGORITHMS[cfg.algo](
        policy_name(cfg, env.observation_space),
        env,
        policy_kwargs=policy_kwargs(cfg, env.observation_space),
        seed=cfg.seed,
        device=cfg.device,
        verbose=0,
        **kwargs,
    )


def make_train_env(cfg: TrainConfig) -> VecEnv:
    """The vectorised training env of ``cfg`` (with reward normalisation if configured).

    :raises ConfigRejected: when the env cannot be made (e.g. a missing optional dependency), its spaces are ones
        the policies cannot read, or there are more copies than one process steps (:mod:`rims_rl.agents.sizes`).
    """
    try:
        check_env_count(cfg)
    except ResourceError as err:
        raise ConfigRejected(str(err)) from None
    try:
        env = make_env(
            cfg.env, n_envs=cfg.n_envs, seed=cfg.seed, vec_env=cfg.vec_env, efference_copy=cfg.efference_copy,
            atari=atari_settings(cfg), gym_packages=cfg.gym_packages,
        )  # fmt: skip
    except UnsupportedSpaceError as err:
        raise ConfigRejected(f"{cfg.env}: {err}") from None
    except (gym.error.Error, ValueError) as err:
        raise ConfigRejected(f"cannot make env {cfg.env}: {str(err).splitlines()[0]}") from None
    if cfg.normalize_obs:
        try:
            check_normalizable(env.observation_space, cfg.env)
        except ValueError as err:
            env.close()
            raise ConfigRejected(str(err)) from None
    return normalize(env, obs=cfg.normalize_obs, reward=cfg.normalize_reward, gamma=cfg.algo_settings.gamma)


def prepare(cfg: TrainConfig) -> Prepared:
    """Build the training env and the model for ``cfg``, writing nothing.

    :raises ConfigRejected: when the env cannot be made or SB3 rejects the settings (e.g. ``ppo.use_sde`` with
        discrete actions).
    """
    env = make_train_env(cfg)
    try:
        check_memory(cfg, env.observation_space)
    except ResourceError as err:
        env.close()
        raise ConfigRejected(str(err)) from None
    try:
        model = build_model(cfg, env)
    except (ValueError, AssertionError, TypeError) as err:
        env.close()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigRejected(f"the model cannot be built with this configuration: {first}") from None
    if cfg.transfer.source is not None:  # start from a trained run's weights (agents/transfer.py)
        try:
            load_source_weights(model, cfg.transfer.source)
        except TransferError as err:
            env.close()
            raise ConfigRejected(str(err)) from None
        freeze(model, cfg.transfer.mode)
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
    handle_signals: bool = True,
) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (created; it should be new or empty) and evaluate the final model.

    :param prepared: the env and model from :func:`prepare` (built here if None).
    :param handle_signals: the first SIGINT/SIGTERM finishes the current update, checkpoints and stops
        (:class:`~rims_rl.agents.callbacks.GracefulStop`); a second stops at once.
    :raises ConfigRejected: before anything is written, if the env or model cannot be built.
    :raises RunRejected: if another process trains into ``run_dir``.
    :raises TrainingInterrupted: after a signal (the run can be resumed with :func:`resume`).
    :raises TrainingDiverged: when a loss or parameter becomes non-finite (the last good checkpoint is kept).
    """
    prepared = prepared or prepare(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(run_dir).acquire()
    except RunInUse as err:
        prepared.env.close()
        raise RunRejected(str(err)) from None
    try:
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
        session = _Session(cfg, run_dir, prepared.env, prepared.model, meta, None)
        return session.run(progress_bar, callbacks or [], handle_signals)
    finally:
        lock.release()


def load_run(run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The config and metadata of a run directory, checked to be readable by this version.

    :raises RunRejected: if ``run_dir`` is not a run directory, or its config or version does not fit this one.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunRejected(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "run.json").is_file():
        raise RunRejected(f"{run_dir} is not a rims-rl run directory (no config.yaml and run.json)")
    try:
        meta = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        raise RunRejected(f"{run_dir / 'run.json'} is not readable JSON") from None
    version = str(meta.get("rims_rl_version", "?"))
    if version.split(".")[:2] != __version__.split(".")[:2]:
        raise RunRejected(
            f"{run_dir} was written by rims-rl {version}; this is {__version__}: resume it with rims-rl {version}"
        )
    try:
        cfg = TrainConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunRejected(f"{run_dir / 'config.yaml'} is not a config this version can run ({first})") from None
    return cfg, meta


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return prefix.rstrip(".") if a != b else None


def resume(
    run_dir: Path,
    *,
    device: str | None = None,
    progress_bar: bool = False,
    callbacks: list[BaseCallback] | None = None,
    handle_signals: bool = True,
) -> TrainResult:
    """Continue a run from its newest whole checkpoint (a damaged newer one is skipped with a warning).

    :param device: where to continue (default: the run's ``device``); a run may move between machines.
    :param callbacks: extra callbacks, as given to :func:`train` (their state is restored if they have
        ``load_state_dict``).
    :raises RunRejected: nothing to resume (finished, no checkpoint), in use, or written by another version.
    """
    run_dir = Path(run_dir)
    cfg, meta = load_run(run_dir)
    ckpt, state, skipped = _resumable_checkpoint(run_dir, cfg, meta)
    try:
        lock = RunLock(run_dir).acquire()
    except RunInUse as err:
        raise RunRejected(str(err)) from None
    try:
        for damaged, problem in skipped:
            log.warning("checkpoint %s is damaged (%s): using the one before it", damaged.path.name, problem)
        try:
            env = make_train_env(cfg)
        except ConfigRejected as err:
            raise RunRejected(str(err)) from None
        try:
            model = ALGORITHMS[cfg.algo].load(ckpt.model_file, env=env, device=device or cfg.device, force_reset=False)
        except Exception as err:
            env.close()
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunRejected(f"cannot load {ckpt.model_file}: {first}") from None
        if cfg.transfer.source is not None:  # checkpoints keep weights, not which of them train
            freeze(model, cfg.transfer.mode)
        exact = restore_env(env, state["env"])
        if state.get("lstm_states") is not None:
            model._last_lstm_states = to_device(state["lstm_states"], model.device)
        if not exact:  # the episodes running at the checkpoint restart from a reset
            log.warning(
                "the state of %s is not saved in checkpoints: the episodes in progress at step %d restart",
                state["env"]["kinds"][-1],
                ckpt.timesteps,
            )
            env.seed(resume_seed(cfg.seed, ckpt.timesteps))
            model._last_obs = None  # type: ignore[assignment]
        meta.setdefault("resumes", []).append(
            {
                "from_timesteps": ckpt.timesteps,
                "checkpoint": ckpt.path.name,
                "env_state_restored": exact,
                "skipped_damaged": [c.path.name for c, _ in skipped],
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        meta["rims_rl_version"] = __version__
        return _Session(cfg, run_dir, env, model, meta, state).run(progress_bar, callbacks or [], handle_signals)
    finally:
        lock.release()


def _resumable_checkpoint(
    run_dir: Path, cfg: TrainConfig, meta: dict[str, Any]
) -> tuple[Checkpoint, dict[str, Any], list[tuple[Checkpoint, str]]]:
    """The newest whole checkpoint of an unfinished run that no process holds, its state, and the damaged newer
    ones skipped. :raises RunRejected: otherwise, or when config.yaml differs from the checkpoints' config."""
    if meta.get("status") == "finished":
        raise RunRejected(f"run {run_dir} is finished ({meta.get('timesteps')} steps): nothing to resume")
    try:
        RunLock.check(run_dir)  # checked, not taken: a refused resume writes nothing
    except RunInUse as err:
        raise RunRejected(str(err)) from None
    ckpt, skipped = latest_checkpoint(run_dir)
    if ckpt is None:
        raise RunRejected(f"{run_dir} has no whole checkpoint to resume from (start it again with --overwrite)")
    try:
        state = ckpt.load_state()
    except Exception as err:
        raise RunRejected(f"cannot read {ckpt.state_file}: {type(err).__name__}: {err}"[:300]) from None
    try:  # the saved config through this version's schema: keys added since (with their defaults) are no edit
        saved = TrainConfig.model_validate(state.get("config")).model_dump()
    except ValidationError:
        saved = state.get("config")
    changed = _first_difference(cfg.model_dump(), saved)
    if changed:
        raise RunRejected(
            f"{run_dir / 'config.yaml'} differs from the config its checkpoints were made with ({changed}): "
            "put it back, or start a new run"
        )
    return ckpt, state, skipped


class _Session:
    """One training session in a run directory, read top to bottom in :meth:`run` as SB3's ``learn()``: logging,
    callbacks, the state of a resumed run, learning, then the final model and its evaluation."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        env: VecEnv,
        model: Algorithm,
        meta: dict[str, Any],
        state: dict[str, Any] | None,
    ) -> None:
        self.cfg, self.run_dir, self.env, self.model, self.meta, self.state = cfg, run_dir, env, model, meta, state
        self.resumed_from: int | None = state["timesteps"] if state is not None else None
        self.stop = GracefulStop()
        self.callbacks: list[BaseCallback] = []
        self.wandb_run: Any = None
        self.eval_env: VecEnv | None = None
        self.progress: ProgressBarCallback | None = None
        self.checkpointer = RunCheckpointCallback(
            self.save_checkpoint,
            every_steps=cfg.checkpoint.every_steps,
            every_minutes=cfg.checkpoint.every_minutes,
            stop=self.stop,
        )

    def run(self, progress_bar: bool, callbacks: list[BaseCallback], handle_signals: bool) -> TrainResult:
        self._start_logging()
        self._build_callbacks(callbacks, progress_bar)
        training_done = self._restore() if self.state is not None else False
        installed = handle_signals and self.stop.install()
        try:
            seconds = self._learn(training_done)
            result = self._save_and_evaluate()
        finally:
            if installed:
                self.stop.uninstall()
        return self._finish(result, seconds)

    # ---- setup ---------------------------------------------------------------------------------------------------
    def _start_logging(self) -> None:
        """The W&B run (continued on resume) and the logger: progress.csv (cut back to a resumed step), W&B."""
        cfg, meta = self.cfg, self.meta
        wandb_id = (meta.get("wandb") or {}).get("id") if self.state is not None else None
        tags = [cfg.policy, cfg.algo, *cfg.ablations, *([cfg.transfer.mode] if cfg.transfer.source else [])]
        self.wandb_run = start_wandb(
            cfg.wandb.mode, self.run_dir, cfg.model_dump(), project=cfg.wandb.project, entity=cfg.wandb.entity,
            group=cfg.wandb.group or cfg.env, job_type=cfg.policy, tags=[*tags, *cfg.wandb.tags],
            name=self.run_dir.name, run_id=wandb_id,
        )  # fmt: skip
        if self.wandb_run is not None:
            meta["wandb"] = {
                "mode": cfg.wandb.mode,
                "id": self.wandb_run.id,
                "dir": str(Path(self.wandb_run.dir).parent),
            }
        meta["status"] = "running"
        _write_json(self.run_dir / "run.json", meta)
        outputs = [ResumableCSVOutputFormat(self.run_dir / "progress.csv", keep_until=self.resumed_from)]
        if self.wandb_run is not None:
            outputs.append(WandbOutputFormat(self.wandb_run))
        self.model.set_logger(Logger(str(self.run_dir), outputs))

    def _build_callbacks(self, extra: list[BaseCallback], progress_bar: bool) -> None:
        """Checkpoints, activation recording (before evaluation, which runs the policy on other envs), periodic
        evaluation, the caller's callbacks, the progress bar; in this order (a checkpoint keeps their states)."""
        cfg = self.cfg
        self.callbacks.append(self.checkpointer)
        if cfg.policy == "rims" and cfg.activations.record:
            self.callbacks.append(
                RIMActivationCallback(
                    heatmap_every=cfg.activations.heatmap_every if self.wandb_run is not None else 0,
                    heatmap_env=cfg.activations.heatmap_env,
                    save_every=cfg.activations.save_every,
                    save_dir=self.run_dir / ACTIVATIONS_DIR,
                    keep_until=self.resumed_from,
                )
            )
        if cfg.eval.freq > 0:
            self.callbacks.append(self._eval_callback())
        self.callbacks += extra
        if progress_bar:
            self.progress = ProgressBarCallback()
            self.callbacks.append(self.progress)

    def _eval_callback(self) -> SeededEvalCallback:
        """Periodic evaluation on env seeds disjoint from training, stopping at ``eval.stop_at`` if set."""
        cfg = self.cfg
        eval_seed = cfg.seed + EVAL_SEED_OFFSET
        eval_env = make_env(
            cfg.env, n_envs=min(cfg.eval.episodes, EVAL_N_ENVS), seed=eval_seed, efference_copy=cfg.efference_copy,
            atari=atari_settings(cfg).full_games(), gym_packages=cfg.gym_packages,
        )  # fmt: skip
        # EvalCallback copies the observation statistics into it from the training env before each evaluation
        eval_env = normalize(
            eval_env, obs=cfg.normalize_obs, reward=cfg.normalize_reward, gamma=cfg.algo_settings.gamma, training=False
        )
        self.eval_env = eval_env
        threshold = cfg.eval.stop_at
        return SeededEvalCallback(
            eval_env, seed=eval_seed, stop=self.stop, n_eval_episodes=cfg.eval.episodes,
            eval_freq=max(cfg.eval.freq // cfg.n_envs, 1), deterministic=cfg.eval.deterministic,
            log_path=str(self.run_dir), warn=False, verbose=0,
            callback_on_new_best=StopTrainingOnRewardThreshold(threshold) if threshold is not None else None,
        )  # fmt: skip

    def _restore(self) -> bool:
        """A resumed run's callbacks, pending log values, checkpoint bookkeeping and RNGs; whether it had finished
        learning (and stopped before its final evaluation)."""
        state = self.state
        assert state is not None and self.resumed_from is not None
        for callback, saved in zip(self.callbacks, state["callbacks"], strict=False):
            if saved is not None and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(saved)
        for name in ("name_to_value", "name_to_count", "name_to_excluded"):
            getattr(self.model.logger, name).update(state["logger"][name])
        self.checkpointer.training_done = state["training_done"]
        steps = self.resumed_from
        self.checkpointer.last_checkpoint = Checkpoint(self.run_dir / "checkpoints" / f"ckpt_{steps}_steps", steps)
        restore_rng(state["rng"])  # last: nothing between here and the first rollout draws from the RNGs
        return bool(state["training_done"])

    def save_checkpoint(self) -> Checkpoint:
        """Everything a resume needs (``agents/checkpoints.py``), and run.json pointing at it."""
        model, logger = self.model, self.model.logger
        state = {
            "timesteps": model.num_timesteps,
            "training_done": self.checkpointer.training_done,
            "config": self.cfg.model_dump(),
            "rng": capture_rng(),
            "env": capture_env(self.env),
            "logger": {
                "name_to_value": dict(logger.name_to_value),
                "name_to_count": dict(logger.name_to_count),
                "name_to_excluded": dict(logger.name_to_excluded),
            },
            "callbacks": [c.state_dict() if hasattr(c, "state_dict") else None for c in self.callbacks],
            "wandb_id": self.wandb_run.id if self.wandb_run is not None else None,
        }
        ckpt = write_checkpoint(self.run_dir, model, state, keep=self.cfg.checkpoint.keep, version=__version__)
        self.meta.update(timesteps=model.num_timesteps, checkpoint=ckpt.path.name)
        _write_json(self.run_dir / "run.json", self.meta)
        return ckpt

    # ---- learning ------------------------------------------------------------------------------------------------
    def _learn(self, training_done: bool) -> float:
        """``model.learn`` for the steps left; returns its seconds. A signal ends it with a checkpoint
        (:class:`TrainingInterrupted`), a crash or a divergence with the run directory saying so."""
        model, stop = self.model, self.stop
        start = time.perf_counter()
        try:
            remaining = self.cfg.total_timesteps - model.num_timesteps
            if not training_done and remaining > 0:
                model.log_every = log_interval(self.cfg)
                model.learn(
                    remaining, callback=CallbackList(self.callbacks), reset_num_timesteps=self.state is None,
                    log_interval=1,
                )  # fmt: skip
            if stop.requested:  # the signal came during the last update: the final checkpoint is written
                raise self._stopped(self.checkpointer.last_checkpoint)
            stop.immediate = True  # from here on nothing is left to checkpoint: a signal stops at once
        except StopForCheckpoint:
            raise self._stopped(self.checkpointer.last_checkpoint) from None
        except KeyboardInterrupt:  # a second signal, or Ctrl-C without our handler
            raise self._stopped(None) from None
        except TrainingInterrupted:
            raise
        except BaseException as err:
            raise self._failed(err) from None
        finally:
            self.env.close()
            if self.eval_env is not None:
                self.eval_env.close()
        return time.perf_counter() - start

    def _stopped(self, checkpoint: Checkpoint | None) -> TrainingInterrupted:
        """The run marked interrupted (at ``checkpoint``, else the newest whole one), the W&B run closed."""
        if self.progress is not None and getattr(self.progress, "pbar", None) is not None:
            self.progress.pbar.close()
        if checkpoint is None:
            checkpoint = latest_checkpoint(self.run_dir)[0]
        steps = checkpoint.timesteps if checkpoint else 0
        self.meta.update(status="interrupted", timesteps=steps)
        _write_json(self.run_dir / "run.json", self.meta)
        self._finish_wandb(128 + (self.stop.signum or 2))
        return TrainingInterrupted(self.run_dir, checkpoint.path if checkpoint else None, steps, self.stop.signal_name)

    def _failed(self, err: BaseException) -> BaseException:
        """A crash or a divergence: the run directory says so and the W&B run is closed. NaN weights or outputs
        make torch.distributions refuse a minibatch or a rollout step, which is a divergence too."""
        model = self.model
        diverged = None
        if not isinstance(err, TrainingDiverged) and isinstance(err, Exception):
            bad = nonfinite_parameter(model.policy)
            if bad is not None:
                diverged = TrainingDiverged(model.num_timesteps, f"parameter {bad}")
            elif is_divergence_error(err):
                diverged = TrainingDiverged(model.num_timesteps, "the policy's output")
        shown = diverged or err
        self.meta.update(status="failed", error=f"{type(shown).__name__}: {shown}"[:500], failed_at=model.num_timesteps)
        _write_json(self.run_dir / "run.json", self.meta)
        self._finish_wandb(1)
        return shown

    # ---- the end -------------------------------------------------------------------------------------------------
    def _save_and_evaluate(self) -> EvalResult:
        """``model.zip`` (written whole or not at all) and the final evaluation (a signal here stops at once)."""
        cfg, model = self.cfg, self.model
        try:
            tmp = self.run_dir / "model.tmp.zip"
            model.save(tmp)
            normalizer = find_normalizer(self.env)
            if normalizer is not None:  # the observation statistics the model expects, beside it
                write_stats(normalizer, self.run_dir)
            tmp.replace(self.run_dir / "model.zip")
            return evaluate(
                model, cfg.env, episodes=cfg.eval.episodes, deterministic=cfg.eval.deterministic,
                seed=cfg.seed + EVAL_SEED_OFFSET, efference_copy=cfg.efference_copy, atari=atari_settings(cfg),
                obs_stats=ObsStats.of(normalizer) if normalizer is not None else None,
            )  # fmt: skip
        except KeyboardInterrupt:
            raise self._stopped(self.checkpointer.last_checkpoint) from None

    def _finish(self, result: EvalResult, seconds: float) -> TrainResult:
        _write_json(self.run_dir / "eval.json", result.to_dict())
        meta = self.meta
        meta.update(status="finished", timesteps=self.model.num_timesteps)
        meta["seconds"] = round(meta.get("seconds", 0.0) + seconds, 2)
        _write_json(self.run_dir / "run.json", meta)
        if self.wandb_run is not None:
            self.wandb_run.summary.update(
                {"eval/mean_return": result.mean_return, "eval/std_return": result.std_return}
            )
            finish_wandb(self.wandb_run)
        return TrainResult(self.run_dir, self.model.num_timesteps, seconds, result, self.resumed_from)

    def _finish_wandb(self, code: int) -> None:
        if self.wandb_run is not None:
            # a stopped or failed run: do not hold the user long if W&B's service went down with it (Ctrl-C)
            finish_wandb(self.wandb_run, exit_code=code, wait_s=5.0)
