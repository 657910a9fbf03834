"""Rollout buffers for recurrent on-policy algorithms.

:class:`CompactRecurrentRolloutBuffer` is sb3-contrib's ``RecurrentRolloutBuffer`` (same sampling, same sequences,
same padded tensors) with two differences that matter for image observations:

- observations are stored in the observation space's dtype (``uint8`` Atari frames: 4x less memory than the
  ``float32`` copy SB3 keeps, and less to move per minibatch);
- the observations of a minibatch are returned *unpadded* (the ``mask.sum()`` real samples, in the order of the
  padded layout) instead of padded to ``n_seq x max_length``: the policy runs its feature extractor on those only
  and scatters the features into the padded layout (see ``rims_rl.policies._SharedCriticGradMixin``). On Atari
  the padding often doubled the CNN's work.

Every other field (actions, values, advantages, returns, episode starts, states, mask) is padded exactly as in
sb3-contrib, so the algorithm's loss code is unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer, create_sequencers
from sb3_contrib.common.recurrent.type_aliases import (
    RecurrentDictRolloutBufferSamples,
    RecurrentRolloutBufferSamples,
    RNNStates,
)
from stable_baselines3.common.vec_env import VecNormalize

__all__ = [
    "COMPACT_BUFFERS",
    "CompactRecurrentDictRolloutBuffer",
    "CompactRecurrentRolloutBuffer",
    "compact_buffer_class",
    "whole_rollout",
]


def _padded_fields(
    buffer: RecurrentRolloutBuffer | RecurrentDictRolloutBuffer, batch_inds: np.ndarray, env_change: np.ndarray
) -> dict[str, Any]:
    """sb3-contrib's ``_get_samples`` without the observations: every other field, padded exactly as there.

    The padded layout puts sequence j's step t at ``j * max_length + t`` and the sequences are the batch's samples in
    order: the rows of ``batch_inds`` are exactly the padded positions where ``mask`` is 1, in that order.
    """
    buffer.seq_start_indices, buffer.pad, buffer.pad_and_flatten = create_sequencers(
        buffer.episode_starts[batch_inds], env_change[batch_inds], buffer.device
    )
    n_seq = len(buffer.seq_start_indices)
    max_length = buffer.pad(buffer.actions[batch_inds]).shape[1]
    starts = batch_inds[buffer.seq_start_indices]
    states_pi = (buffer.hidden_states_pi[starts].swapaxes(0, 1), buffer.cell_states_pi[starts].swapaxes(0, 1))
    states_vf = (buffer.hidden_states_vf[starts].swapaxes(0, 1), buffer.cell_states_vf[starts].swapaxes(0, 1))
    return dict(
        actions=buffer.pad(buffer.actions[batch_inds]).reshape((n_seq * max_length, *buffer.actions.shape[1:])),
        old_values=buffer.pad_and_flatten(buffer.values[batch_inds]),
        old_log_prob=buffer.pad_and_flatten(buffer.log_probs[batch_inds]),
        advantages=buffer.pad_and_flatten(buffer.advantages[batch_inds]),
        returns=buffer.pad_and_flatten(buffer.returns[batch_inds]),
        lstm_states=RNNStates(
            (buffer.to_torch(states_pi[0]).contiguous(), buffer.to_torch(states_pi[1]).contiguous()),
            (buffer.to_torch(states_vf[0]).contiguous(), buffer.to_torch(states_vf[1]).contiguous()),
        ),
        episode_starts=buffer.pad_and_flatten(buffer.episode_starts[batch_inds]),
        mask=buffer.pad_and_flatten(np.ones_like(buffer.returns[batch_inds])),
    )


class CompactRecurrentRolloutBuffer(RecurrentRolloutBuffer):
    """sb3-contrib's recurrent rollout buffer with native-dtype, unpadded observations (module docstring).

    The constructor takes sb3-contrib's arguments. Use it only with a policy that accepts unpadded observations
    (``policy.compact_observations``), and give the policy each minibatch's ``mask`` as ``padding_mask``.
    """

    def reset(self) -> None:
        super().reset()
        dtype = getattr(self.observation_space, "dtype", None)
        if dtype is not None and dtype != np.float32:
            self.observations = np.zeros((self.buffer_size, self.n_envs, *self.obs_shape), dtype=dtype)

    def _get_samples(
        self,
        batch_inds: np.ndarray,
        env_change: np.ndarray,
        env: VecNormalize | None = None,
    ) -> RecurrentRolloutBufferSamples:
        fields = _padded_fields(self, batch_inds, env_change)
        return RecurrentRolloutBufferSamples(observations=self.to_torch(self.observations[batch_inds]), **fields)


class CompactRecurrentDictRolloutBuffer(RecurrentDictRolloutBuffer):
    """sb3-contrib's recurrent dict rollout buffer with unpadded observations (module docstring): each key's
    ``mask.sum()`` real samples, in the order of the padded layout. Same constructor and same use as
    :class:`CompactRecurrentRolloutBuffer`."""

    def _get_samples(
        self,
        batch_inds: np.ndarray,
        env_change: np.ndarray,
        env: VecNormalize | None = None,
    ) -> RecurrentDictRolloutBufferSamples:
        fields = _padded_fields(self, batch_inds, env_change)
        observations = {key: self.to_torch(obs[batch_inds]) for key, obs in self.observations.items()}
        return RecurrentDictRolloutBufferSamples(observations=observations, **fields)


COMPACT_BUFFERS = (CompactRecurrentRolloutBuffer, CompactRecurrentDictRolloutBuffer)
"""The buffers whose minibatch observations are unpadded (the policy needs its ``padding_mask``)."""


def compact_buffer_class(observation_space: spaces.Space) -> type[RecurrentRolloutBuffer]:
    """The compact buffer for ``observation_space`` (for policies with ``compact_observations``)."""
    if isinstance(observation_space, spaces.Dict):
        return CompactRecurrentDictRolloutBuffer
    return CompactRecurrentRolloutBuffer


_STEP_FIELDS = ("actions", "values", "log_probs", "advantages", "returns", "episode_starts")
_STATE_FIELDS = ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf")


def whole_rollout(buffer: RecurrentRolloutBuffer | RecurrentDictRolloutBuffer) -> Any:
    """The whole content of a full recurrent rollout buffer as one batch, in order (for A2C's single update).

    Each env's steps in order, env after env; a sequence starts at each env's first step and at each episode start.
    sb3-contrib's ``get()`` also cuts one sequence at a random index (to vary its minibatches); a whole-rollout
    update needs no such cut. Works for sb3-contrib's recurrent buffers (vector and dict observations) and the
    compact ones; the fields are laid out as ``get()`` lays them out.
    """
    if not buffer.full:
        raise ValueError("the rollout buffer must be full before its rollout is read")
    if not buffer.generator_ready:  # the layout sb3-contrib's get() prepares: env-major, one row per step
        for name in _STATE_FIELDS:
            setattr(buffer, name, getattr(buffer, name).swapaxes(1, 2))
        if isinstance(buffer.observations, dict):
            buffer.observations = {k: buffer.swap_and_flatten(v) for k, v in buffer.observations.items()}
        else:
            buffer.observations = buffer.swap_and_flatten(buffer.observations)
        for name in _STEP_FIELDS + _STATE_FIELDS:
            setattr(buffer, name, buffer.swap_and_flatten(getattr(buffer, name)))
        buffer.generator_ready = True
    env_change = np.zeros((buffer.buffer_size, buffer.n_envs))
    env_change[0, :] = 1.0
    return buffer._get_samples(np.arange(buffer.buffer_size * buffer.n_envs), buffer.swap_and_flatten(env_change))
