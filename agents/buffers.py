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

import numpy as np
from sb3_contrib.common.recurrent.buffers import RecurrentRolloutBuffer, create_sequencers
from sb3_contrib.common.recurrent.type_aliases import RecurrentRolloutBufferSamples, RNNStates
from stable_baselines3.common.vec_env import VecNormalize

__all__ = ["CompactRecurrentRolloutBuffer"]


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
