"""Recurrent actor-critic policies for sb3-contrib's ``RecurrentPPO`` (and the project's ``RecurrentA2C``).

RIM policies (``RIMPolicy``, ``RIMCnnPolicy``, ``RIMMultiInputPolicy``) replace the LSTM of sb3-contrib's
:class:`~sb3_contrib.common.recurrent.policies.RecurrentActorCriticPolicy` by a :class:`~rims_rl.rim.RIM`; the
output of the RIM (all units' hidden states, concatenated, paper App. C.3) feeds the policy and value heads.
Everything else (feature extractors, heads, ``net_arch``, distributions) is sb3-contrib's, so they are drop-in::

    from sb3_contrib import RecurrentPPO
    from rims_rl import RIMPolicy

    model = RecurrentPPO(RIMPolicy, "CartPoleNoVel-v1", policy_kwargs=dict(num_units=6, unit_size=32, k_active=4))

Contract with sb3-contrib: the recurrent state is the same ``(h, c)`` pair of shape ``(1, n_envs, K * H)`` that
its rollout buffer stores, and the RIM is reachable as ``policy.lstm_actor`` (with ``num_layers`` and
``hidden_size`` like ``nn.LSTM``), so ``RecurrentPPO`` and ``rims_rl.agents.recurrent_a2c.RecurrentA2C`` work unchanged.
A minibatch's sequences run through the RIM in one call; episode starts inside a sequence reset the state at that
step. Opt-in (``RIMPolicy.pack_minibatches``, or ``RIMS_RL_PACK=1``), in training, where the algorithm marks the
padding (``padding_mask``: the project's ``RecurrentPPO`` and ``RecurrentA2C`` do), the sequences are packed into
fewer rows first (:func:`pack_sequences`).

The LSTM baselines (``MlpLstmPolicy``, ``CnnLstmPolicy``, ``MultiInputLstmPolicy``) are sb3-contrib's policies with
two fixes: ``save()``/``load()`` keep the LSTM sizes, and a sequence whose only episode start is its first step runs
through ``nn.LSTM`` in one call instead of sb3-contrib's per-step loop (same result, several times faster).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
)
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from rims_rl.extractors import NatureCNNGrid, input_set_shape
from rims_rl.rim import RIM, RIMInfo, run_together

__all__ = [
    "INPUT_SETS",
    "CnnLstmPolicy",
    "MlpLstmPolicy",
    "MultiInputLstmPolicy",
    "PackedSequences",
    "RIMCnnPolicy",
    "RIMMultiInputPolicy",
    "RIMPolicy",
    "pack_sequences",
]

INPUT_SETS = ("vector", "grid")


class PackedSequences(NamedTuple):
    """Where :func:`pack_sequences` put each step of a padded minibatch: ``steps x rows`` slots, time-major."""

    steps: int  # L', the packed call's sequence length
    rows: int  # B', its batch size
    source: th.Tensor  # (L' * B',) long: the padded position (sequence-major, n_seq * L) each slot reads (0 if empty)
    first: th.Tensor  # (n_seq,) long: the slot of each sequence's first step
    unpack: th.Tensor  # (n_seq * L,) long: the slot of each padded position; L' * B' (an extra zero row) at padding


def pack_sequences(lengths: list[int], max_length: int) -> PackedSequences:
    """Pack sequences of the given lengths, padded to ``max_length`` (sb3-contrib's minibatch layout: sequence-major,
    padding after each sequence's end), into fewer rows: each row runs several sequences one after the other,
    each from its own initial state (:meth:`RIM.forward <rims_rl.rim.RIM.forward>`'s ``start_states``).

    PPO's recurrent minibatches are cut from the rollout at episode ends and at minibatch boundaries, so their
    sequences have very different lengths: on Atari (``configs/atari.yaml``) 3-7 sequences padded to 111 steps on
    average, 1.83x the real samples. A RIM's step costs about the same for any batch that small, so the padding
    costs nearly its share. Rows are filled first-fit, longest sequence first, each up to the longest sequence's
    length: the packed call has as many steps as the padded one and at most as many rows (on the recorded Atari
    minibatches, 2.7 rows on average instead of 4.3).
    """
    n_seq = len(lengths)
    steps = max(lengths)
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(n_seq), key=lambda i: -lengths[i]):  # longest first (a stable sort: ties in order)
        row = next((r for r in range(len(bins)) if fill[r] + lengths[i] <= steps), len(bins))
        if row == len(bins):
            bins.append([])
            fill.append(0)
        bins[row].append(i)
        fill[row] += lengths[i]
    rows = len(bins)
    source = th.zeros(steps * rows, dtype=th.long)
    first = th.zeros(n_seq, dtype=th.long)
    unpack = th.full((n_seq * max_length,), steps * rows, dtype=th.long)
    for row, sequences in enumerate(bins):
        offset = 0
        for i in sequences:
            t = th.arange(lengths[i])
            slots = (offset + t) * rows + row
            source[slots] = i * max_length + t
            unpack[i * max_length + t] = slots
            first[i] = offset * rows + row
            offset += lengths[i]
    return PackedSequences(steps, rows, source, first, unpack)


def _packing_for(mask: th.Tensor | None, n_seq: int, n_padded: int) -> PackedSequences | None:
    """The packing of a minibatch whose padding ``mask`` (True at samples, ``(n_seq * L,)``) has its padding after
    each sequence's end, where it saves work; otherwise None."""
    if mask is None or mask.shape[0] != n_padded or n_padded % n_seq:
        return None
    max_length = n_padded // n_seq
    mask = mask.view(n_seq, max_length)
    lengths = mask.sum(1)
    at_end = mask == (th.arange(max_length, device=mask.device) < lengths.unsqueeze(1))
    if not bool(lengths.all()) or not bool(at_end.all()):
        return None
    packing = pack_sequences(lengths.tolist(), max_length)
    if packing.rows == n_seq and packing.steps == max_length:
        return None
    return packing


class _SharedCriticGradMixin:
    """sb3-contrib's forward passes, with one option added: ``shared_critic_grad``.

    With a shared recurrent net (``shared_lstm``/``shared_rim``), sb3-contrib feeds the critic a *detached* copy of
    the actor's recurrent output, so only the policy loss trains the recurrent net. ``shared_critic_grad=True``
    lets the value loss train it too: one recurrent core for actor and critic, trained by the whole PPO/A2C loss,
    as in the PPO implementation the paper used (Kostrikov, 2018; App. C.12). Otherwise identical to sb3-contrib.

    Two speed-ups that change no result:

    - *compact observations*: sb3-contrib's buffer pads every minibatch to ``n_seq x max_length`` samples, so the
      feature extractor (a CNN on Atari: most of the compute) ran on padding too. When the algorithm sets
      :attr:`padding_mask` (``rims_rl.agents.buffers``' compact buffers do, via ``rims_rl.agents.ppo``) and the
      observations are the unpadded samples, the extractor runs on those only and its features are scattered into
      the padded layout (zeros at padding, which only follows the end of a sequence and is masked from the loss).
    - images go through the CNN in channels-last memory format on CPU (~1.35x faster convolutions there).

    The RIM policies add a third, opt-in, which changes results by rounding: with :attr:`padding_mask` set, the RIM
    runs on the minibatch's sequences packed into fewer rows (:func:`pack_sequences`, ``RIMPolicy.pack_minibatches``).
    ``nn.LSTM`` has no such input (``pack_padded_sequence`` measured 5x slower than the padded call on the CPU at
    Atari's shapes), so the LSTM policies run the padded layout.
    """

    shared_critic_grad: bool
    shared_lstm: bool
    padding_mask: th.Tensor | None = None
    """Set by the algorithm around each training minibatch: True at the padded positions that hold a sample."""
    compact_observations = True
    """Tells the compact rollout buffers (``rims_rl.agents.buffers``) that this policy accepts unpadded observations."""

    def extract_features(self, obs, features_extractor=None):  # type: ignore[no-untyped-def]
        if isinstance(obs, th.Tensor) and obs.dim() == 4 and obs.device.type == "cpu":
            obs = obs.contiguous(memory_format=th.channels_last)
        if features_extractor is None:
            return super().extract_features(obs)  # type: ignore[misc]
        return super().extract_features(obs, features_extractor)  # type: ignore[misc]

    def _sequence_features(self, obs, episode_starts):  # type: ignore[no-untyped-def]
        """Features in the padded layout of ``episode_starts``, from padded or (with the mask) unpadded obs."""
        features = self.extract_features(obs)
        n_obs = (next(iter(obs.values())) if isinstance(obs, dict) else obs).shape[0]
        mask = self.padding_mask
        if n_obs == episode_starts.shape[0]:
            return features
        if mask is None or mask.shape[0] != episode_starts.shape[0] or int(mask.sum()) != n_obs:
            raise ValueError(
                f"got {n_obs} observations for {episode_starts.shape[0]} padded steps without a matching padding_mask"
            )

        def scatter(f: th.Tensor) -> th.Tensor:
            out = f.new_zeros(mask.shape[0], f.shape[1])
            out[mask] = f
            return out

        return scatter(features) if self.share_features_extractor else tuple(scatter(f) for f in features)  # type: ignore[attr-defined]

    def _process_actor_critic(self, pi_features, vf_features, lstm_states, episode_starts):  # type: ignore[no-untyped-def]
        """The actor's and the critic's recurrent cores, each on its features: ``(latent, states)`` for each."""
        return (
            self._process_sequence(pi_features, lstm_states.pi, episode_starts, self.lstm_actor),  # type: ignore[attr-defined]
            self._process_sequence(vf_features, lstm_states.vf, episode_starts, self.lstm_critic),  # type: ignore[attr-defined]
        )

    def _critic_latent(self, latent_pi: th.Tensor) -> th.Tensor:
        return latent_pi if self.shared_critic_grad else latent_pi.detach()

    def forward(self, obs, lstm_states, episode_starts, deterministic=False):  # type: ignore[no-untyped-def]
        features = self.extract_features(obs)  # type: ignore[attr-defined]
        pi_features, vf_features = (features, features) if self.share_features_extractor else features  # type: ignore[attr-defined]
        if self.lstm_critic is not None:  # type: ignore[attr-defined]
            (latent_pi, states_pi), (latent_vf, states_vf) = self._process_actor_critic(
                pi_features, vf_features, lstm_states, episode_starts
            )
        else:
            latent_pi, states_pi = self._process_sequence(pi_features, lstm_states.pi, episode_starts, self.lstm_actor)  # type: ignore[attr-defined]
            if self.shared_lstm:
                latent_vf = self._critic_latent(latent_pi)
                states_vf = (states_pi[0].detach(), states_pi[1].detach())
            else:
                latent_vf = self.critic(vf_features)  # type: ignore[attr-defined]
                states_vf = states_pi
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)  # type: ignore[attr-defined]
        latent_vf = self.mlp_extractor.forward_critic(latent_vf)  # type: ignore[attr-defined]
        values = self.value_net(latent_vf)  # type: ignore[attr-defined]
        distribution = self._get_action_dist_from_latent(latent_pi)  # type: ignore[attr-defined]
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        actions = actions.reshape((-1, *self.action_space.shape))  # type: ignore[attr-defined]
        return actions, values, log_prob, RNNStates(states_pi, states_vf)

    def predict_values(self, obs, lstm_states, episode_starts):  # type: ignore[no-untyped-def]
        features = BasePolicy.extract_features(self, obs, self.vf_features_extractor)  # type: ignore[arg-type, attr-defined]
        if self.lstm_critic is not None:  # type: ignore[attr-defined]
            latent_vf, _ = self._process_sequence(features, lstm_states, episode_starts, self.lstm_critic)  # type: ignore[attr-defined]
        elif self.shared_lstm:
            latent_pi, _ = self._process_sequence(features, lstm_states, episode_starts, self.lstm_actor)  # type: ignore[attr-defined]
            latent_vf = self._critic_latent(latent_pi)
        else:
            latent_vf = self.critic(features)  # type: ignore[attr-defined]
        return self.value_net(self.mlp_extractor.forward_critic(latent_vf))  # type: ignore[attr-defined]

    def evaluate_actions(self, obs, actions, lstm_states, episode_starts):  # type: ignore[no-untyped-def]
        features = self._sequence_features(obs, episode_starts)
        pi_features, vf_features = (features, features) if self.share_features_extractor else features  # type: ignore[attr-defined]
        if self.lstm_critic is not None:  # type: ignore[attr-defined]
            (latent_pi, _), (latent_vf, _) = self._process_actor_critic(
                pi_features, vf_features, lstm_states, episode_starts
            )
        else:
            latent_pi, _ = self._process_sequence(pi_features, lstm_states.pi, episode_starts, self.lstm_actor)  # type: ignore[attr-defined]
            latent_vf = self._critic_latent(latent_pi) if self.shared_lstm else self.critic(vf_features)  # type: ignore[attr-defined]
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)  # type: ignore[attr-defined]
        latent_vf = self.mlp_extractor.forward_critic(latent_vf)  # type: ignore[attr-defined]
        distribution = self._get_action_dist_from_latent(latent_pi)  # type: ignore[attr-defined]
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()  # type: ignore[attr-defined]


class RIMPolicy(_SharedCriticGradMixin, RecurrentActorCriticPolicy):
    """Actor-critic policy whose recurrent core is a RIM (Goyal et al., 2021), for vector observations.

    Parameters are sb3-contrib's ``RecurrentActorCriticPolicy`` ones, with the LSTM options replaced by:

    :param num_units: K, the number of RIMs.
    :param unit_size: H, the hidden size of each RIM; the heads read ``K * H`` features.
    :param k_active: how many units are active per step.
    :param cell: ``"lstm"`` or ``"gru"`` dynamics per unit.
    :param rim_kwargs: further :class:`~rims_rl.rim.RIM` arguments (attention sizes and heads, ``dropout``,
        ``input_attention``, ``communication``).
    :param shared_rim: the critic reuses the actor's RIM output, detached (sb3-contrib's ``shared_lstm``).
    :param enable_critic_rim: the critic has its own RIM (sb3-contrib's ``enable_critic_lstm``, default).
        With neither, the critic is a linear layer on the features. The actor's and the critic's RIMs run through
        :func:`~rims_rl.rim.run_together` (one after the other, or with ``rim_fast.PARALLEL_LOOPS`` their C++
        loops at once on two threads; same results).
    :param shared_critic_grad: with ``shared_rim``, the value loss trains the shared RIM too (one recurrent core
        trained by the whole loss, as in the PPO code the paper used); sb3-contrib's default detaches it.

    After every forward pass of the actor's RIM, :attr:`rim_info` holds its :class:`~rims_rl.rim.RIMInfo`
    (activation mask ``(L, n_seq, K)`` and input attention), for callbacks that log activations at no extra cost.

    Dropout (``rim_kwargs["dropout"]``) defaults to 0 here, not to the standalone module's 0.1 (the paper's Table 3):
    SB3 collects rollouts in eval mode and runs the update in train mode, so with dropout the update's first
    log-probabilities differ from the rollout's and the PPO ratio does not start at 1 (up to ~0.15 away with an O(1)
    action head). Pass ``rim_kwargs=dict(dropout=0.1)`` for the paper's value. The winners are chosen before dropout,
    so they are the same in both modes.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        share_features_extractor: bool = True,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        num_units: int = 6,
        unit_size: int = 100,
        k_active: int = 4,
        cell: str = "lstm",
        rim_kwargs: dict[str, Any] | None = None,
        shared_rim: bool = False,
        enable_critic_rim: bool = True,
        shared_critic_grad: bool = False,
    ):
        self.shared_critic_grad = shared_critic_grad
        if shared_rim and enable_critic_rim:
            raise ValueError("shared_rim and enable_critic_rim are exclusive: set enable_critic_rim=False to share")
        if shared_rim and not share_features_extractor:
            raise ValueError("shared_rim needs share_features_extractor=True")
        self.rim_kwargs = {"dropout": 0.0, **(rim_kwargs or {})}  # (class docstring)
        reserved = {"input_size", "num_units", "unit_size", "k_active", "cell"} & set(self.rim_kwargs)
        if reserved:
            raise ValueError(f"pass {', '.join(sorted(reserved))} as policy arguments, not in rim_kwargs")
        self.num_units, self.unit_size, self.k_active, self.cell = num_units, unit_size, k_active, cell
        self.shared_rim, self.enable_critic_rim = shared_rim, enable_critic_rim
        self.lstm_output_dim = num_units * unit_size  # what the heads read (sb3-contrib's name)
        # Skip RecurrentActorCriticPolicy.__init__, which would build nn.LSTMs; its methods only need the
        # attributes set below.
        ActorCriticPolicy.__init__(
            self,
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            activation_fn,
            ortho_init,
            use_sde,
            log_std_init,
            full_std,
            use_expln,
            squash_output,
            features_extractor_class,
            features_extractor_kwargs,
            share_features_extractor,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
        )
        extractor = self.features_extractor if share_features_extractor else self.pi_features_extractor
        self.input_set_size, element_size = input_set_shape(extractor, self.features_dim)

        def make_rim() -> RIM:
            return RIM(element_size, num_units=num_units, unit_size=unit_size, k_active=k_active, cell=cell,
                       **self.rim_kwargs)  # fmt: skip

        self.rim_actor = make_rim()
        self.rim_critic = make_rim() if enable_critic_rim else None
        self.critic = None
        if not (shared_rim or enable_critic_rim):
            self.critic = nn.Linear(self.features_dim, self.lstm_output_dim)
        # Names sb3-contrib's methods and RecurrentPPO read.
        self.shared_lstm, self.enable_critic_lstm = shared_rim, enable_critic_rim
        self.lstm_hidden_state_shape = (1, 1, self.lstm_output_dim)
        self.rim_info: RIMInfo | None = None
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    @property
    def lstm_actor(self) -> RIM:
        """The actor's RIM, under the name sb3-contrib uses (``RecurrentPPO`` sizes its buffers from it)."""
        return self.rim_actor

    @property
    def lstm_critic(self) -> RIM | None:
        """The critic's RIM (None unless ``enable_critic_rim``), under sb3-contrib's name."""
        return self.rim_critic

    def _process_sequence(  # type: ignore[override]
        self,
        features: th.Tensor,
        lstm_states: tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        lstm: RIM,
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        """Run padded sequences through a RIM in one call.

        ``features`` is ``(n_seq * L, N * D)`` (sequence-major, as sb3-contrib's buffer pads them),
        ``lstm_states`` a pair of ``(1, n_seq, K * H)``, ``episode_starts`` ``(n_seq * L,)``.
        Returns ``(n_seq * L, K * H)`` outputs and the final state pair.
        """
        return self._sequence_result(lstm, *lstm(*self._sequence_call(features, lstm_states, episode_starts, lstm)[1:]))

    def _process_actor_critic(self, pi_features, vf_features, lstm_states, episode_starts):  # type: ignore[no-untyped-def]
        """Both RIMs through :func:`rims_rl.rim.run_together`: the same results as one after the other (which it
        does by default; see ``rim_fast.PARALLEL_LOOPS``)."""
        assert self.rim_critic is not None
        calls = [
            self._sequence_call(pi_features, lstm_states.pi, episode_starts, self.rim_actor),
            self._sequence_call(vf_features, lstm_states.vf, episode_starts, self.rim_critic),
        ]
        return [self._sequence_result(call[0], *out) for call, out in zip(calls, run_together(calls), strict=True)]

    def evaluate_actions(self, obs, actions, lstm_states, episode_starts):  # type: ignore[no-untyped-def]
        """sb3-contrib's; with :attr:`pack_minibatches`, on the training minibatch's sequences packed into fewer rows
        where the algorithm set :attr:`padding_mask` (:func:`pack_sequences`; the same results up to rounding, as the
        tests check)."""
        self._packing = None
        if self.pack_minibatches and not any(s.requires_grad for s in lstm_states.pi + lstm_states.vf):
            self._packing = _packing_for(self.padding_mask, lstm_states.pi[0].shape[1], episode_starts.shape[0])
        try:
            return super().evaluate_actions(obs, actions, lstm_states, episode_starts)
        finally:
            self._packing = None

    pack_minibatches: bool = os.environ.get("RIMS_RL_PACK", "0") == "1"
    """Whether :meth:`evaluate_actions` packs a padded minibatch's sequences into fewer rows (:func:`pack_sequences`):
    0.88x the time of DemonAttack's RecurrentPPO training step (README, "Performance"). Opt-in, as the fused kernels
    (``rims_rl.rim_fast.FUSED_KERNELS``): it changes a run's numbers by rounding, and PPO follows the rounding to
    another run of the same seed, so the library's defaults keep reproducing the documented results and the learning
    tests. The environment variable ``RIMS_RL_PACK=1`` makes the default True (``RIMS_RL_PACK=1 rims-rl train ...``);
    the benchmark scripts set it."""
    _packing: PackedSequences | None = None

    def _sequence_call(
        self, features: th.Tensor, lstm_states: tuple[th.Tensor, th.Tensor], episode_starts: th.Tensor, lstm: RIM
    ) -> tuple[Any, ...]:
        """The RIM call for padded sequences: ``(rim, input (L, n_seq, N, D), state, episode_starts (L, n_seq))``,
        or for their packing (:attr:`_packing`, set by :meth:`evaluate_actions`): ``(rim, input (L', B', N, D),
        None, episode_starts (L', B'), start_states)``, every sequence's first step a reset to its initial state."""
        n_seq = lstm_states[0].shape[1]
        packing = self._packing
        if packing is None:
            x = features.reshape(n_seq, -1, self.input_set_size, lstm.input_size).transpose(0, 1)
            starts = episode_starts.reshape(n_seq, -1).transpose(0, 1)
            return lstm, x, (lstm_states[0][0], lstm_states[1][0]), starts
        shape = (packing.steps, packing.rows)
        source, first = packing.source.to(features.device), packing.first.to(features.device)
        x = features.index_select(0, source).view(*shape, self.input_set_size, lstm.input_size)
        starts = episode_starts.index_select(0, source)
        sequence_starts = episode_starts.view(n_seq, -1)[:, 0]
        starts[first] = 1.0  # every sequence starts with a reset: to zero where its episode starts, else its state
        carried = (1.0 - sequence_starts).to(features.dtype).unsqueeze(1)
        start_states = []
        for state in lstm_states:
            start = state.new_zeros(shape[0] * shape[1], lstm.hidden_size)
            start[first] = state[0] * carried
            start_states.append(start.view(*shape, -1))
        return lstm, x, None, starts.view(shape), tuple(start_states)

    def _sequence_result(
        self, lstm: RIM, output: th.Tensor, state: tuple[th.Tensor, th.Tensor], info: RIMInfo
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor] | None]:
        """A RIM call's results in sb3-contrib's layout (and the actor's :class:`RIMInfo` kept for logging); for a
        packed call (:meth:`_sequence_call`), the outputs and the info back in the padded layout (zeros at the
        padding) and no final state (the state after each sequence is not kept; ``evaluate_actions`` needs none)."""
        packing = self._packing
        if packing is not None:
            unpack = packing.unpack.to(output.device)

            def unpacked(x: th.Tensor) -> th.Tensor:
                rows = x.reshape(packing.steps * packing.rows, -1)
                return th.cat([rows, rows.new_zeros(1, rows.shape[1])]).index_select(0, unpack)

            if lstm is self.rim_actor:  # (L, n_seq, ...) as from a padded call
                n_seq = len(packing.first)
                self.rim_info = RIMInfo(
                    *(unpacked(x).view(n_seq, -1, *x.shape[2:]).transpose(0, 1) for x in info)  # type: ignore[arg-type]
                )
            return unpacked(output), None
        if lstm is self.rim_actor:
            self.rim_info = info
        h, c = state
        return output.transpose(0, 1).reshape(-1, lstm.hidden_size), (h.unsqueeze(0), c.unsqueeze(0))

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            num_units=self.num_units,
            unit_size=self.unit_size,
            k_active=self.k_active,
            cell=self.cell,
            rim_kwargs=self.rim_kwargs,
            shared_rim=self.shared_rim,
            enable_critic_rim=self.enable_critic_rim,
            shared_critic_grad=self.shared_critic_grad,
            share_features_extractor=self.share_features_extractor,
            normalize_images=self.normalize_images,
        )
        return data


class RIMCnnPolicy(RIMPolicy):
    """:class:`RIMPolicy` for image observations, with the Nature CNN.

    :param input_set: what the RIM reads: ``"vector"``, the CNN's 512-d output vector (one element, as in the
        authors' Atari code; SB3's ``NatureCNN``), or ``"grid"``, the CNN's last feature map as a set of positions,
        each with its coordinates (:class:`~rims_rl.extractors.NatureCNNGrid`), so that units can attend to
        different places. Only used when ``features_extractor_class`` is not given.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        features_extractor_class: type[BaseFeaturesExtractor] | None = None,
        input_set: str = "vector",
        **kwargs: Any,
    ):
        if input_set not in INPUT_SETS:
            raise ValueError(f"input_set must be one of {', '.join(INPUT_SETS)}, got {input_set!r}")
        self.input_set = input_set
        if features_extractor_class is None:
            features_extractor_class = NatureCNNGrid if input_set == "grid" else NatureCNN
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            *args,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["input_set"] = self.input_set
        return data


class RIMMultiInputPolicy(RIMPolicy):
    """:class:`RIMPolicy` for dict observations, with SB3's ``CombinedExtractor`` by default."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor,
        **kwargs: Any,
    ):
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            *args,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


# --------------------------------------------------------------------------------------------------------------------
# LSTM baselines
# --------------------------------------------------------------------------------------------------------------------
class MlpLstmPolicy(_SharedCriticGradMixin, RecurrentActorCriticPolicy):
    """sb3-contrib's LSTM actor-critic policy, with its sizes kept by ``save()``/``load()`` and a one-call fast
    path for sequences that start an episode only at their first step (every minibatch sequence sb3-contrib's
    buffer makes). Parameters are ``RecurrentActorCriticPolicy``'s, plus:

    :param shared_critic_grad: with ``shared_lstm``, the value loss trains the shared LSTM too (see
        :class:`RIMPolicy`); sb3-contrib's default detaches it.
    """

    def __init__(self, *args: Any, shared_critic_grad: bool = False, **kwargs: Any):
        self.shared_critic_grad = shared_critic_grad
        super().__init__(*args, **kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            lstm_hidden_size=self.lstm_output_dim,
            n_lstm_layers=self.lstm_actor.num_layers,
            shared_lstm=self.shared_lstm,
            enable_critic_lstm=self.enable_critic_lstm,
            lstm_kwargs=self.lstm_kwargs,
            shared_critic_grad=self.shared_critic_grad,
            share_features_extractor=self.share_features_extractor,
            normalize_images=self.normalize_images,
        )
        return data

    @staticmethod
    def _process_sequence(
        features: th.Tensor,
        lstm_states: tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        lstm: nn.LSTM,
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        n_seq = lstm_states[0].shape[1]
        starts = episode_starts.reshape(n_seq, -1)
        if starts.shape[1] > 1 and bool(starts[:, 1:].any()):
            # An episode starts inside a sequence: sb3-contrib's per-step loop resets the state there.
            return RecurrentActorCriticPolicy._process_sequence(features, lstm_states, episode_starts, lstm)
        keep = (1.0 - starts[:, 0]).view(1, n_seq, 1)
        x = features.reshape(n_seq, -1, lstm.input_size).transpose(0, 1)
        output, states = lstm(x, (keep * lstm_states[0], keep * lstm_states[1]))
        return output.transpose(0, 1).reshape(-1, lstm.hidden_size), states


class CnnLstmPolicy(MlpLstmPolicy):
    """:class:`MlpLstmPolicy` with SB3's Nature CNN (sb3-contrib's ``CnnLstmPolicy``)."""

    def __init__(self, *args: Any, features_extractor_class: type[BaseFeaturesExtractor] = NatureCNN, **kwargs: Any):
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)


class MultiInputLstmPolicy(MlpLstmPolicy):
    """:class:`MlpLstmPolicy` with SB3's ``CombinedExtractor`` (sb3-contrib's ``MultiInputLstmPolicy``)."""

    def __init__(
        self, *args: Any, features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor, **kwargs: Any
    ):
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)
