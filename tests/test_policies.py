"""RIM and LSTM policies inside sb3-contrib's RecurrentPPO."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO as ContribRecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.torch_layers import NatureCNN

import rims_rl.envs  # registers the NoVel ids
import rims_rl.policies
import rims_rl.rim_fast
from rims_rl import RIM
from rims_rl.agents.ppo import RecurrentPPO
from rims_rl.extractors import NatureCNNGrid
from rims_rl.policies import (
    MlpLstmPolicy,
    RIMCnnPolicy,
    RIMMultiInputPolicy,
    RIMPolicy,
    pack_sequences,
)

SMALL_RIM = dict(num_units=4, unit_size=8, k_active=2, rim_kwargs=dict(input_key_size=8, comm_key_size=8, dropout=0.0))


def lr(_: float) -> float:
    return 1e-3


def make_policy(cls=RIMPolicy, obs_space=None, **kwargs):
    obs_space = obs_space or spaces.Box(-1, 1, (4,), np.float32)
    th.manual_seed(0)
    return cls(obs_space, spaces.Discrete(3), lr, **kwargs)


def zero_states(policy, n):
    shape = (1, n, policy.lstm_output_dim)
    return RNNStates((th.zeros(shape), th.zeros(shape)), (th.zeros(shape), th.zeros(shape)))


def test_rim_policy_drives_sb3_contribs_recurrent_ppo_unchanged():
    env = make_vec_env("CartPoleNoVel-v1", n_envs=3, seed=0)
    model = ContribRecurrentPPO(RIMPolicy, env, n_steps=16, batch_size=24, n_epochs=2, policy_kwargs=SMALL_RIM, seed=0)
    assert isinstance(model.policy.lstm_actor, RIM)
    model.learn(96)
    assert model.num_timesteps == 96
    assert model._last_lstm_states.pi[0].shape == (1, 3, 4 * 8)
    assert model.rollout_buffer.hidden_states_pi.shape[-1] == 32


def test_training_sequences_reproduce_the_rollout_step_by_step():
    """What PPO's update recomputes over a padded sequence (one RIM call, episode start inside) equals what the
    rollout computed one step at a time: the log-probabilities and values that the PPO ratio compares."""
    policy = make_policy(**SMALL_RIM)
    policy.set_training_mode(False)
    g = th.Generator().manual_seed(0)
    n_seq, L = 3, 9
    obs = th.randn(n_seq, L, 4, generator=g)
    starts = th.zeros(n_seq, L)
    starts[:, 0] = 1
    starts[1, 5] = 1  # an episode start inside a sequence
    actions = th.randint(0, 3, (n_seq, L), generator=g)
    states = zero_states(policy, n_seq)
    step_values, step_logp = [], []
    with th.no_grad():
        for t in range(L):
            dist, _ = policy.get_distribution(obs[:, t], states.pi, starts[:, t])
            values = policy.predict_values(obs[:, t], states.vf, starts[:, t])
            step_logp.append(dist.log_prob(actions[:, t]))
            step_values.append(values.flatten())
            _, _, _, states = policy(obs[:, t], states, starts[:, t])
        values, logp, _ = policy.evaluate_actions(
            obs.reshape(-1, 4), actions.reshape(-1), zero_states(policy, n_seq), starts.reshape(-1)
        )
    th.testing.assert_close(logp.view(n_seq, L), th.stack(step_logp, 1), atol=1e-5, rtol=1e-5)
    th.testing.assert_close(values.view(n_seq, L), th.stack(step_values, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "lengths, n_rows",
    [([128, 20, 64, 44], 2), ([5, 1, 3], 2), ([7, 7], 2), ([61, 33, 95, 37, 30, 5, 128], 4), ([9], 1)],
    ids=["4", "3", "2", "7", "1"],
)
def test_packing_puts_every_step_in_one_slot_in_order(lengths, n_rows):
    """:func:`pack_sequences`: each sequence's steps fill consecutive slots of one row, in order, no slot is
    shared, ``unpack`` inverts ``source``, and the packed call has the padded one's steps in as many rows or fewer."""
    L, n_seq = max(lengths), len(lengths)
    packing = pack_sequences(lengths, L)
    steps, rows = packing.steps, packing.rows
    assert steps == L and rows == n_rows <= n_seq  # first fit, longest first: 128 | 64 + 44 + 20 for the first
    used = set()
    for i, n in enumerate(lengths):
        slots = packing.unpack[i * L : i * L + n]
        first = int(packing.first[i])
        assert slots.tolist() == [first + t * rows for t in range(n)]  # one row, consecutive steps
        assert (packing.source[slots] == i * L + th.arange(n)).all()
        assert (packing.unpack[i * L + n : (i + 1) * L] == steps * rows).all()  # padding: the zero row
        used |= set(slots.tolist())
    assert len(used) == sum(lengths) and max(used) < steps * rows


@pytest.mark.parametrize("critic", ["enable_critic_rim", "shared_rim"])
def test_packed_training_minibatch_gives_the_padded_evaluation(critic, monkeypatch):
    """``evaluate_actions`` on a compact minibatch (:attr:`padding_mask` set, as the project's RecurrentPPO does)
    packs its sequences into fewer rows: the values, log-probabilities, entropies, activations and gradients at
    the samples are those of the padded call (float32 rounding); with the actor's and critic's RIMs too."""
    kwargs = dict(SMALL_RIM, enable_critic_rim=critic == "enable_critic_rim", shared_rim=critic == "shared_rim")
    policy = make_policy(**kwargs)
    g = th.Generator().manual_seed(1)
    lengths, L = [9, 2, 5, 3, 6, 1], 9
    n_seq = len(lengths)
    mask = (th.arange(L) < th.tensor(lengths).unsqueeze(1)).reshape(-1)
    obs = th.randn(int(mask.sum()), 4, generator=g)  # unpadded, as the compact buffers give them
    actions = th.randint(0, 3, (n_seq * L,), generator=g)
    starts = th.zeros(n_seq, L)
    starts[::2, 0] = 1  # every other sequence starts an episode, the others carry a state
    states = tuple(th.randn(1, n_seq, policy.lstm_output_dim, generator=g) * 0.5 for _ in range(4))
    states = RNNStates(states[:2], states[2:])
    results, batches = [], []
    prepare = rims_rl.rim_fast._prepare
    monkeypatch.setattr(
        rims_rl.rim_fast, "_prepare", lambda rim, x, *a: batches.append(x.shape[:2]) or prepare(rim, x, *a)
    )
    for pack in (False, True):
        policy.pack_minibatches = pack
        policy.padding_mask = mask
        policy.zero_grad()
        values, logp, entropy = policy.evaluate_actions(obs, actions, states, starts.reshape(-1))
        (values.flatten()[mask].sum() + logp[mask].sin().sum() + entropy[mask].sum()).backward()
        info = policy.rim_info
        seen = [x.transpose(0, 1).reshape(n_seq * L, -1)[mask] for x in info]
        grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
        results.append([values.flatten()[mask], logp[mask], entropy[mask], *seen, *grads])
    policy.padding_mask = None
    calls = 2 if critic == "enable_critic_rim" else 1  # (the actor's and the critic's RIM)
    assert batches == [(9, 6)] * calls + [(9, 3)] * calls  # 9 | 6 + 3 | 5 + 2 + 1: the padded 54 steps in 27
    assert len(results[0]) == len(results[1])
    for padded, packed in zip(*results, strict=True):
        th.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-4)


def test_a_ppo_update_on_packed_minibatches_equals_the_padded_one(monkeypatch):
    """Two PPO updates of the project's RecurrentPPO (compact buffer) on CartPoleNoVel, whose short episodes give
    minibatches of many sequences of different lengths: with the sequences packed into fewer rows, the parameters
    end where the padded calls take them (float32 rounding)."""
    packings = []
    packing_for = rims_rl.policies._packing_for
    monkeypatch.setattr(rims_rl.policies, "_packing_for", lambda *a: packings.append(packing_for(*a)) or packings[-1])
    params = []
    for pack in (False, True):
        monkeypatch.setattr(RIMPolicy, "pack_minibatches", pack)
        env = make_vec_env("CartPoleNoVel-v1", n_envs=4, seed=0)
        model = RecurrentPPO(RIMPolicy, env, n_steps=32, batch_size=64, n_epochs=2, policy_kwargs=SMALL_RIM, seed=0)
        model.learn(256)
        params.append(th.nn.utils.parameters_to_vector(model.policy.parameters()).detach())
        env.close()
    assert any(p is not None and p.rows < len(p.first) for p in packings)  # minibatches in fewer rows
    th.testing.assert_close(params[1], params[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False), (None, False)])
def test_rims_rl_pack_switches_the_packed_minibatches_on(value, expected):
    """``RIMS_RL_PACK=1`` turns the packed training minibatches on for a whole process (the ``rims-rl`` command);
    unset or 0 keeps the default, off (as ``RIMS_RL_FUSED``: packing changes a run's numbers by rounding)."""
    env = {k: v for k, v in os.environ.items() if k != "RIMS_RL_PACK"}
    if value is not None:
        env["RIMS_RL_PACK"] = value
    code = "from rims_rl.policies import RIMCnnPolicy as p; print(p.pack_minibatches)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(expected)


def test_policy_exposes_the_actor_rims_activations_of_the_last_forward():
    policy = make_policy(**SMALL_RIM)
    with th.no_grad():
        policy(th.randn(5, 4), zero_states(policy, 5), th.zeros(5))
    assert policy.rim_info.activation_mask.shape == (1, 5, 4)
    assert (policy.rim_info.activation_mask.sum(-1) == 2).all()


@pytest.mark.parametrize("cls", [RIMPolicy, MlpLstmPolicy])
def test_policy_save_and_load_round_trip_with_non_default_sizes(cls, tmp_path):
    kwargs = SMALL_RIM if cls is RIMPolicy else dict(lstm_hidden_size=24, shared_lstm=True, enable_critic_lstm=False)
    policy = make_policy(cls, **kwargs)
    obs = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    actions, state = policy.predict(obs, deterministic=True)
    policy.save(tmp_path / "policy.pt")
    loaded = cls.load(tmp_path / "policy.pt")
    actions2, state2 = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(actions, actions2)
    np.testing.assert_allclose(state[0], state2[0])
    assert loaded.lstm_output_dim == policy.lstm_output_dim


def test_sb3_contribs_own_lstm_policy_does_not_round_trip_sizes(tmp_path):
    """Why the project ships its own LSTM policy classes (the bug they fix)."""
    policy = make_policy(RecurrentActorCriticPolicy, lstm_hidden_size=24)
    policy.save(tmp_path / "policy.pt")
    with pytest.raises(RuntimeError, match="size mismatch"):
        RecurrentActorCriticPolicy.load(tmp_path / "policy.pt")


def test_lstm_fast_path_equals_sb3_contribs_step_loop():
    policy = make_policy(MlpLstmPolicy, lstm_hidden_size=16)
    g = th.Generator().manual_seed(0)
    features = th.randn(3 * 7, 4, generator=g)
    states = (th.randn(1, 3, 16, generator=g), th.randn(1, 3, 16, generator=g))
    starts = th.zeros(3, 7)
    starts[0, 0] = 1  # a start only at a sequence's first step: the one-call path
    fast = MlpLstmPolicy._process_sequence(features, states, starts.flatten(), policy.lstm_actor)
    loop = RecurrentActorCriticPolicy._process_sequence(features, states, starts.flatten(), policy.lstm_actor)
    th.testing.assert_close(fast[0], loop[0])
    th.testing.assert_close(fast[1][0], loop[1][0])


@pytest.mark.parametrize("recurrent_critic", ["shared", "shared_detached"])
def test_shared_core_is_trained_by_the_value_loss_only_when_asked(recurrent_critic):
    kwargs = dict(SMALL_RIM, shared_rim=True, enable_critic_rim=False, shared_critic_grad=recurrent_critic == "shared")
    policy = make_policy(**kwargs)
    values, _, _ = policy.evaluate_actions(th.randn(6, 4), th.zeros(6), zero_states(policy, 2), th.zeros(6))
    values.sum().backward()
    reached = policy.rim_actor.weight_hh.grad is not None and policy.rim_actor.weight_hh.grad.abs().sum() > 0
    assert reached == (recurrent_critic == "shared")


def test_cnn_policy_reads_the_cnn_vector_or_its_grid_of_positions():
    image = spaces.Box(0, 255, (4, 84, 84), np.uint8)
    vector = make_policy(RIMCnnPolicy, image, **SMALL_RIM)
    assert isinstance(vector.features_extractor, NatureCNN) and vector.input_set_size == 1
    grid = make_policy(RIMCnnPolicy, image, input_set="grid", **SMALL_RIM)
    assert isinstance(grid.features_extractor, NatureCNNGrid)
    assert grid.input_set_size == 49 and grid.rim_actor.input_size == 66  # 7x7 positions, 64 channels + (row, col)
    obs = th.randint(0, 255, (2, 4, 84, 84)).float()
    with th.no_grad():
        grid(obs, zero_states(grid, 2), th.ones(2))
    assert grid.rim_info.input_attention.shape == (1, 2, 4, 50)
    with pytest.raises(ValueError, match="input_set must be one of vector, grid"):
        make_policy(RIMCnnPolicy, image, input_set="pixels", **SMALL_RIM)


def test_grid_extractor_appends_each_positions_coordinates():
    image = spaces.Box(0, 255, (1, 52, 52), np.uint8)
    extractor = NatureCNNGrid(image)
    assert extractor.set_size == 9  # 52 -> 12 -> 5 -> 3
    out = extractor(th.zeros(1, 1, 52, 52)).view(extractor.set_size, extractor.element_size)
    coords = out[:, -2:]
    assert coords.min() == -1 and coords.max() == 1
    assert len({tuple(c) for c in coords.tolist()}) == extractor.set_size  # every position is distinct


def test_multi_input_policy_takes_dict_observations():
    obs_space = spaces.Dict({"a": spaces.Box(-1, 1, (3,), np.float32), "b": spaces.Box(-1, 1, (2,), np.float32)})
    policy = make_policy(RIMMultiInputPolicy, obs_space, **SMALL_RIM)
    obs = {"a": th.randn(2, 3), "b": th.randn(2, 2)}
    with th.no_grad():
        actions, values, _, _ = policy(obs, zero_states(policy, 2), th.ones(2))
    assert actions.shape == (2,) and values.shape == (2, 1)


def test_policy_aliases_and_model_save_load(tmp_path):
    env = make_vec_env("CartPoleNoVel-v1", n_envs=2, seed=0)
    model = RecurrentPPO("RIMPolicy", env, n_steps=8, batch_size=16, n_epochs=1, policy_kwargs=SMALL_RIM, seed=0)
    model.learn(16)
    model.save(tmp_path / "model.zip")
    loaded = RecurrentPPO.load(tmp_path / "model.zip")
    obs = env.reset()
    a1, _ = model.predict(obs, deterministic=True)
    a2, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    assert loaded.policy.rim_actor.k_active == 2


def test_bad_policy_arguments_are_rejected():
    with pytest.raises(ValueError, match="k_active must be an integer in"):
        make_policy(num_units=3, k_active=4)
    with pytest.raises(ValueError, match="shared_rim and enable_critic_rim are exclusive"):
        make_policy(shared_rim=True, enable_critic_rim=True)
    with pytest.raises(ValueError, match="pass num_units as policy arguments"):
        make_policy(rim_kwargs=dict(num_units=3))


def test_policies_default_to_no_attention_dropout_so_the_first_ppo_ratio_is_one():
    """The module keeps Table 3's 0.1; a policy defaults to 0, so its train-mode update re-computes the rollout's
    log-probabilities exactly (a PPO ratio of 1 at the first epoch)."""
    assert RIM(4).dropout == 0.1
    model = RecurrentPPO(RIMPolicy, "CartPoleNoVel-v1", n_steps=16, batch_size=16, n_epochs=1, seed=0,
                         policy_kwargs=dict(num_units=3, unit_size=8, k_active=2))  # fmt: skip
    assert model.policy.rim_actor.dropout == 0.0
    model.learn(16)
    assert model.logger.name_to_value["train/clip_fraction"] == 0.0
    assert RIMPolicy(model.observation_space, model.action_space, lambda _: 1e-3,
                     rim_kwargs=dict(dropout=0.1)).rim_actor.dropout == 0.1  # fmt: skip
