"""Callbacks that keep a long run safe: checkpoints, graceful stops on signals, divergence checks, evaluations that
neither disturb training nor block a stop.

* :class:`GracefulStop` turns the first SIGINT (Ctrl-C) or SIGTERM (what a pre-empted cloud machine gets) into a
  request: the current PPO update finishes, a checkpoint is written, and training stops. A second signal stops at
  once (``KeyboardInterrupt``), losing only the work since the last checkpoint.
* :class:`RunCheckpointCallback` decides *when* to checkpoint: at rollout boundaries, every ``every_steps`` env
  steps and/or every ``every_minutes`` of wall time, on a stop request, and at the end. At each boundary it checks
  that the update's losses and the parameters are finite, and before each checkpoint that the policy's output on
  the current observations is; if not it raises :class:`TrainingDiverged` and writes nothing, so the newest
  checkpoint is the last good one.
* :class:`SeededEvalCallback` is SB3's ``EvalCallback`` with four changes: every evaluation plays the same env
  seeds (a fixed evaluation set: less noise between evaluations, and identical after a resume); the evaluation
  draws from a fork of the global RNGs, so evaluating (or not, or being interrupted) never changes the training
  trajectory; a stop request aborts an evaluation in progress; its ``eval/*`` values are written with the
  rollout's row (one row per update in ``progress.csv``, at the rollout's env step) instead of a row of their
  own. Its state (the evaluation history) is saved in checkpoints through :meth:`SeededEvalCallback.state_dict`.

Callbacks with ``state_dict()``/``load_state_dict()`` methods have their state saved in checkpoints and restored on
resume (the training loop matches them by position).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.vec_env import VecEnv

__all__ = [
    "EvaluationAborted",
    "GracefulStop",
    "RunCheckpointCallback",
    "SeededEvalCallback",
    "StopForCheckpoint",
    "TrainingDiverged",
    "is_divergence_error",
    "nonfinite_parameter",
]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss or a parameter became NaN or infinite; no checkpoint was written after it."""

    def __init__(self, timesteps: int, what: str) -> None:
        super().__init__(f"training diverged at step {timesteps}: {what} is not finite")
        self.timesteps, self.what = timesteps, what


class StopForCheckpoint(Exception):
    """Raised by :class:`RunCheckpointCallback` after the checkpoint a stop request asked for (ends ``learn``)."""


class EvaluationAborted(Exception):
    """An evaluation in progress was abandoned because a stop was requested."""


class GracefulStop:
    """First SIGINT/SIGTERM: request a stop at the next checkpoint boundary. Second: ``KeyboardInterrupt`` at once.

    With ``immediate`` set, the first signal already raises ``KeyboardInterrupt`` (used once training is over and
    nothing is left to checkpoint).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.immediate = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def install(self) -> bool:
        """Take over SIGINT and SIGTERM (main thread only); False if signals cannot be handled here."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.immediate or self.signum is not None:
            self.signum = self.signum or signum
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received: finishing the current update to save a checkpoint (Ctrl-C again stops at once, losing "
            "the work since the last checkpoint)",
            signal.Signals(signum).name,
        )


class RunCheckpointCallback(BaseCallback):
    """Checkpoints at rollout boundaries (see the module docstring); ``save`` writes one and returns its path."""

    def __init__(
        self,
        save: Callable[[], Any],
        *,
        every_steps: int = 0,
        every_minutes: float = 0.0,
        stop: GracefulStop | None = None,
    ) -> None:
        super().__init__()
        self.save, self.every_steps, self.every_minutes, self.stop = save, every_steps, every_minutes, stop
        self.training_done = False
        self.last_checkpoint: Any = None
        self._fresh = True
        self._last_steps = 0
        self._last_time = 0.0

    def _on_training_start(self) -> None:
        self._fresh = True  # the first rollout start of a learn() call is where the run (re)started: nothing new
        self._last_steps = self.model.num_timesteps
        self._last_time = time.monotonic()

    def _on_rollout_start(self) -> None:
        if self._fresh:
            self._fresh = False
            return
        self.check_finite()
        if self.stop is not None and self.stop.requested:
            self._save()
            raise StopForCheckpoint
        steps_due = self.every_steps > 0 and self.model.num_timesteps - self._last_steps >= self.every_steps
        time_due = self.every_minutes > 0 and time.monotonic() - self._last_time >= 60.0 * self.every_minutes
        if steps_due or time_due:
            self._save()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self.check_finite()
        self.training_done = True
        self._save()

    def _save(self) -> None:
        self.check_outputs()
        self.last_checkpoint = self.save()
        self._last_steps = self.model.num_timesteps
        self._last_time = time.monotonic()

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a pending ``train/`` loss or any policy parameter is not finite."""
        for key, value in self.logger.name_to_value.items():
            if key.startswith("train/") and isinstance(value, (int, float, np.number)) and not math.isfinite(value):
                raise TrainingDiverged(self.model.num_timesteps, key)
        name = nonfinite_parameter(self.model.policy)
        if name is not None:
            raise TrainingDiverged(self.model.num_timesteps, f"parameter {name}")

    def check_outputs(self) -> None:
        """Raise :class:`TrainingDiverged` if the policy's actions or values on the current observations are not
        finite (finite weights can still overflow). Greedy, in eval mode, on a fork of the RNGs: it changes
        nothing."""
        model = self.model
        states = getattr(model, "_last_lstm_states", None)
        if model._last_obs is None or states is None:
            return
        policy = model.policy
        training = policy.training
        policy.set_training_mode(False)
        try:
            with th.no_grad(), th.random.fork_rng(devices=[]):
                obs, _ = policy.obs_to_tensor(model._last_obs)
                starts = th.as_tensor(model._last_episode_starts, dtype=th.float32, device=model.device)
                _, values, log_prob, _ = policy(obs, states, starts, deterministic=True)
            finite = bool(th.isfinite(values).all() and th.isfinite(log_prob).all())
        except ValueError:  # torch.distributions refuses NaN parameters
            finite = False
        finally:
            policy.set_training_mode(training)
        if not finite:
            raise TrainingDiverged(model.num_timesteps, "the policy's output on the current observations")


def is_divergence_error(err: BaseException) -> bool:
    """Whether ``err`` is torch.distributions refusing NaN parameters (a policy whose output overflowed)."""
    return isinstance(err, ValueError) and "found invalid values" in str(err)


def nonfinite_parameter(module: th.nn.Module) -> str | None:
    """The name of the first parameter of ``module`` holding a NaN or infinity, or None (one device sync)."""
    params = list(module.parameters())
    if not params or bool(th.stack([th.isfinite(p).all() for p in params]).all()):
        return None
    return next(n for n, p in module.named_parameters() if not th.isfinite(p).all())


def _no_dump(step: int = 0) -> None:
    pass


class SeededEvalCallback(EvalCallback):
    """SB3's ``EvalCallback`` on a fixed evaluation set, outside the training RNG stream, abortable by a stop.

    :param seed: the eval env is reseeded with it before every evaluation.
    :param stop: a stop request skips evaluations and aborts one in progress.
    Other parameters are ``EvalCallback``'s.
    """

    def __init__(self, eval_env: VecEnv, *, seed: int, stop: GracefulStop | None = None, **kwargs: Any) -> None:
        super().__init__(eval_env, **kwargs)
        self.seed, self.stop = seed, stop

    def _on_step(self) -> bool:
        if not (self.eval_freq > 0 and self.n_calls % self.eval_freq == 0):
            return True
        if self.stop is not None and self.stop.requested:
            return True
        self.eval_env.seed(self.seed)
        device = self.model.device
        py_state, np_state = random.getstate(), np.random.get_state()
        self.logger.dump = _no_dump  # type: ignore[method-assign]  # eval/* joins the rollout's row at its step
        try:
            with th.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                return super()._on_step()
        except EvaluationAborted:
            return True
        finally:
            del self.logger.dump
            random.setstate(py_state)
            np.random.set_state(np_state)

    def _log_success_callback(self, locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        if self.stop is not None and self.stop.requested:
            raise EvaluationAborted
        super()._log_success_callback(locals_, globals_)

    def state_dict(self) -> dict[str, Any]:
        keys = ("n_calls", "evaluations_results", "evaluations_timesteps", "evaluations_length",
                "evaluations_successes", "best_mean_reward", "last_mean_reward")  # fmt: skip
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        if self.log_path is not None and self.evaluations_timesteps:  # the file as it was at the checkpoint
            extra = {"successes": self.evaluations_successes} if self.evaluations_successes else {}
            np.savez(
                self.log_path,
                timesteps=self.evaluations_timesteps,
                results=self.evaluations_results,
                ep_lengths=self.evaluations_length,
                **extra,
            )


class StopAtSuccess(BaseCallback):
    """Stops training once the success rate of the last training episodes (SB3's ``ep_success_buffer``, 100) reaches
    ``threshold``; ``reached_at`` is the env step at which it did, or None."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.reached_at: int | None = None

    def _on_step(self) -> bool:
        successes = self.model.ep_success_buffer
        if len(successes) == successes.maxlen and np.mean(successes) >= self.threshold:
            self.reached_at = self.num_timesteps
            return False
        return True
