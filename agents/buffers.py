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
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer, create_sequencers
from sb3_contrib.common.recurrent.type_aliases import RecurrentRolloutBufferSamples, RNNStates
from stable_baselines3.common.vec_env import VecNormalize

__all__ = ["CompactRecurrentRolloutBuffer", "whole_rollout"]


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
        # sb3-contrib's _get_samples, but for the observations. The padded layout puts sequence j's step t at
        # j * max_length + t and the sequences are the batch's samples in order: the rows of ``batch_inds`` are
        # exactly the padded positions where ``mask`` is 1, in that order.
        self.seq_start_indices, self.pad, self.pad_and_flatten = create_sequencers(
            self.episode_starts[batch_inds], env_change[batch_inds], self.device
        )
        n_seq = len(self.seq_start_indices)
        max_length = self.pad(self.actions[batch_inds]).shape[1]
        padded_batch_size = n_seq * max_length
        starts = batch_inds[self.seq_start_indices]
        states_pi = (self.hidden_states_pi[starts].swapaxes(0, 1), self.cell_states_pi[starts].swapaxes(0, 1))
        states_vf = (self.hidden_states_vf[starts].swapaxes(0, 1), self.cell_states_vf[starts].swapaxes(0, 1))
        return RecurrentRolloutBufferSamples(
            observations=self.to_torch(self.observations[batch_inds]),  # unpadded, in padded order
            actions=self.pad(self.actions[batch_inds]).reshape((padded_batch_size, *self.actions.shape[1:])),
            old_values=self.pad_and_flatten(self.values[batch_inds]),
            old_log_prob=self.pad_and_flatten(self.log_probs[batch_inds]),
            advantages=self.pad_and_flatten(self.advantages[batch_inds]),
            returns=self.pad_and_flatten(self.returns[batch_inds]),
            lstm_states=RNNStates(
                (self.to_torch(states_pi[0]).contiguous(), self.to_torch(states_pi[1]).contiguous()),
                (self.to_torch(states_vf[0]).contiguous(), self.to_torch(states_vf[1]).contiguous()),
            ),
            episode_starts=self.pad_and_flatten(self.episode_starts[batch_inds]),
            mask=self.pad_and_flatten(np.ones_like(self.returns[batch_inds])),
        )


_STEP_FIELDS = ("actions", "values", "log_probs", "advantages", "returns", "episode_starts")
_STATE_FIELDS = ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf")


def whole_rollout(buffer: RecurrentRolloutBuffer | RecurrentDictRolloutBuffer) -> Any:
    """The whole content of a full recurrent rollout buffer as one batch, in order (for A2C's single update).

    Each env's steps in order, env after env; a sequence starts at each env's first step and at each episode start.
    sb3-contrib's ``get()`` also cuts one sequence at a random index (to vary its minibatches); a whole-rollout
    update needs no such cut. Works for sb3-contrib's recurrent buffers (vector and dict observations) and
    :class:`CompactRecurrentRolloutBuffer`; the fields are laid out as ``get()`` lays them out.
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
