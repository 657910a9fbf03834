"""Recurrent PPO (Schulman et al., 2017) with the project's policies under their short names.

This is sb3-contrib's :class:`~sb3_contrib.RecurrentPPO` unchanged, with ``policy_aliases`` extended so that users
write a string, as in SB3::

    from rims_rl.agents.ppo import RecurrentPPO
    model = RecurrentPPO("RIMPolicy", "CartPoleNoVel-v1", policy_kwargs=dict(num_units=6, unit_size=32))

``MlpLstmPolicy``/``CnnLstmPolicy``/``MultiInputLstmPolicy`` resolve to the project's versions of sb3-contrib's LSTM
policies (same model, sizes kept on save/load, one-call sequences): see :mod:`rims_rl.policies`.

With those policies the rollout buffer is :class:`rims_rl.agents.buffers.CompactRecurrentRolloutBuffer` (or its ``Dict``
version): minibatch observations not padded, so the feature extractor runs on real samples only. Losses, sampling
and results are sb3-contrib's.

:attr:`RecurrentPPO.iterations` counts the rollouts collected over the whole run (it is saved with the model), so
``time/iterations`` continues across a resumed run instead of restarting at 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from sb3_contrib import RecurrentPPO as _RecurrentPPO
from sb3_contrib.common.recurrent.type_aliases import RecurrentRolloutBufferSamples
from stable_baselines3.common.policies import BasePolicy

from rims_rl.agents.buffers import COMPACT_BUFFERS, compact_buffer_class
from rims_rl.policies import (
    CnnLstmPolicy,
    MlpLstmPolicy,
    MultiInputLstmPolicy,
    RIMCnnPolicy,
    RIMMultiInputPolicy,
    RIMPolicy,
)

__all__ = ["POLICY_ALIASES", "IterationCounter", "RecurrentPPO"]

POLICY_ALIASES: dict[str, type[BasePolicy]] = {
    "RIMPolicy": RIMPolicy,
    "RIMCnnPolicy": RIMCnnPolicy,
    "RIMMultiInputPolicy": RIMMultiInputPolicy,
    "MlpLstmPolicy": MlpLstmPolicy,
    "CnnLstmPolicy": CnnLstmPolicy,
    "MultiInputLstmPolicy": MultiInputLstmPolicy,
}


class IterationCounter:
    """Counts the rollouts of an on-policy algorithm over the whole run, so ``time/iterations`` continues across
    ``learn`` calls and resumed runs instead of restarting at 1 (SB3 counts per ``learn`` call)."""

    iterations: int = 0
    """Rollouts collected over the whole run, across ``learn`` calls and resumes (saved with the model)."""
    log_every: int = 1
    """With ``learn(log_interval=1)``, metrics are written after every ``log_every``-th rollout of the whole run, so
    the rows fall on the same env steps whether or not the run was resumed (SB3 counts per ``learn`` call)."""

    def collect_rollouts(self, *args: Any, **kwargs: Any) -> bool:
        complete = super().collect_rollouts(*args, **kwargs)  # type: ignore[misc]
        if complete:
            self.iterations += 1
        return complete

    def dump_logs(self, iteration: int = 0) -> None:
        if iteration > 0 and self.iterations % self.log_every:
            return
        super().dump_logs(self.iterations if iteration > 0 else 0)  # type: ignore[misc]


class RecurrentPPO(IterationCounter, _RecurrentPPO):
    """sb3-contrib's RecurrentPPO; ``policy`` may name any of :data:`POLICY_ALIASES`. Parameters are
    sb3-contrib's."""

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = POLICY_ALIASES

    def _setup_model(self) -> None:
        super()._setup_model()
        if getattr(self.policy, "compact_observations", False):
            old = self.rollout_buffer
            self.rollout_buffer = compact_buffer_class(self.observation_space)(
                self.n_steps,
                self.observation_space,
                self.action_space,
                old.hidden_state_shape,
                self.device,
                gamma=self.gamma,
                gae_lambda=self.gae_lambda,
                n_envs=self.n_envs,
            )

    def train(self) -> None:
        if not isinstance(self.rollout_buffer, COMPACT_BUFFERS):
            return super().train()
        buffer, policy = self.rollout_buffer, self.policy
        get = buffer.get

        def get_with_mask(*args: Any, **kwargs: Any) -> Iterator[RecurrentRolloutBufferSamples]:
            for samples in get(*args, **kwargs):
                policy.padding_mask = samples.mask > 0  # type: ignore[assignment]
                yield samples

        buffer.get = get_with_mask  # type: ignore[method-assign]
        try:
            super().train()
        finally:
            del buffer.get
            policy.padding_mask = None  # type: ignore[assignment]
