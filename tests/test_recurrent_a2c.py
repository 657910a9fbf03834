"""RecurrentA2C: its update is the A2C loss, computed by hand step by step, and it learns CartPoleNoVel-v1."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

import rims_rl.envs  # noqa: F401  (registers the ids)
from rims_rl.agents.buffers import CompactRecurrentRolloutBuffer, whole_rollout
from rims_rl.agents.recurrent_a2c import RecurrentA2C, RMSpropBiasCorrected
from rims_rl.agents.training import ALGORITHMS, train
from rims_rl.config import CONFIG_DIR, resolve_config

ENT, VF = 0.01, 0.5


def _collected(policy: str, policy_kwargs: dict) -> tuple[RecurrentA2C, dict[str, np.ndarray]]:
    """A model with one rollout in its buffer, and copies of that rollout in (step, env) layout."""
    env = make_vec_env("CartPoleNoVel-v1", n_envs=3, seed=1)
    model = RecurrentA2C(
        policy, env, n_steps=40, learning_rate=0.0, ent_coef=ENT, vf_coef=VF, max_grad_norm=1e9, gae_lambda=0.9,
        seed=0, policy_kwargs=policy_kwargs,
    )  # fmt: skip
    _, callback = model._setup_learn(total_timesteps=1000, callback=None)
    callback.on_training_start(locals(), globals())
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
    b = model.rollout_buffer
    rollout = {
        name: np.array(getattr(b, name))
        for name in ("observations", "actions", "advantages", "returns", "episode_starts")
    }
    for name in ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf"):
        rollout[name] = np.array(getattr(b, name)[0])  # (layers, n_envs, size): each env's state before step 0
    return model, rollout


def _hand_loss(model: RecurrentA2C, r: dict[str, np.ndarray]) -> tuple[th.Tensor, dict[str, th.Tensor]]:
    """The A2C loss, one env and one step at a time: the recurrent state carried through every step (reset at
    episode starts), the terms averaged over all n_steps x n_envs steps."""
    policy = model.policy
    n_steps, n_envs = r["actions"].shape[:2]
    log_probs, values, entropies = [], [], []
    for j in range(n_envs):
        s_pi = (th.tensor(r["hidden_states_pi"][:, j : j + 1]), th.tensor(r["cell_states_pi"][:, j : j + 1]))
        s_vf = (th.tensor(r["hidden_states_vf"][:, j : j + 1]), th.tensor(r["cell_states_vf"][:, j : j + 1]))
        for t in range(n_steps):
            obs = th.tensor(r["observations"][t, j : j + 1], dtype=th.float32)
            start = th.tensor(r["episode_starts"][t, j : j + 1], dtype=th.float32)
            features = policy.extract_features(obs)
            latent_pi, s_pi = policy._process_sequence(features, s_pi, start, policy.lstm_actor)
            latent_vf, s_vf = policy._process_sequence(features, s_vf, start, policy.lstm_critic)
            dist = policy._get_action_dist_from_latent(policy.mlp_extractor.forward_actor(latent_pi))
            action = th.tensor(r["actions"][t, j], dtype=th.long)
            log_probs.append(dist.log_prob(action)[0])
            entropies.append(dist.entropy()[0])
            values.append(policy.value_net(policy.mlp_extractor.forward_critic(latent_vf))[0, 0])
    log_prob, value, entropy = th.stack(log_probs), th.stack(values), th.stack(entropies)
    adv = th.tensor(r["advantages"].T.reshape(-1), dtype=th.float32)  # env-major, as the loop
    ret = th.tensor(r["returns"].T.reshape(-1), dtype=th.float32)
    terms = {
        "policy_loss": -(adv * log_prob).mean(),
        "value_loss": ((ret - value) ** 2).mean(),
        "entropy_loss": -entropy.mean(),
    }
    return terms["policy_loss"] + ENT * terms["entropy_loss"] + VF * terms["value_loss"], terms


@pytest.mark.parametrize(
    "policy, policy_kwargs",
    [
        ("MlpLstmPolicy", dict(lstm_hidden_size=8, net_arch=[16])),
        ("RIMPolicy", dict(num_units=4, unit_size=6, k_active=2, net_arch=[16], rim_kwargs=dict(dropout=0.0))),
    ],
)
def test_update_gradient_equals_hand_computed_a2c_gradient(policy, policy_kwargs):
    model, rollout = _collected(policy, policy_kwargs)
    starts = rollout["episode_starts"]
    assert starts[1:].any(), "the rollout must hold an episode start after its first step (masking matters)"
    params = [p for p in model.policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]

    model.train()  # learning rate 0 and no clipping: leaves the update's gradient in .grad
    grads = [p.grad.clone() if p.grad is not None else th.zeros_like(p) for p in params]
    assert all(th.equal(p, b) for p, b in zip(params, before, strict=True))
    logged = model.logger.name_to_value

    model.policy.set_training_mode(True)
    loss, terms = _hand_loss(model, rollout)
    expected = th.autograd.grad(loss, params, allow_unused=True)
    for name, value in terms.items():
        assert logged[f"train/{name}"] == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name
    for p, g, e in zip(params, grads, expected, strict=True):
        e = th.zeros_like(p) if e is None else e
        assert th.allclose(g, e, rtol=1e-4, atol=1e-6), f"gradient of a {tuple(p.shape)} parameter differs"
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_whole_rollout_is_every_step_once_in_env_order_without_a_random_cut():
    model, rollout = _collected("MlpLstmPolicy", dict(lstm_hidden_size=8))
    assert isinstance(model.rollout_buffer, CompactRecurrentRolloutBuffer)
    data = whole_rollout(model.rollout_buffer)
    mask = data.mask > 0
    n_steps, n_envs = rollout["actions"].shape[:2]
    assert int(mask.sum()) == n_steps * n_envs and len(data.observations) == n_steps * n_envs
    expected_actions = rollout["actions"].transpose(1, 0, 2).reshape(-1)
    assert np.array_equal(data.actions[mask].flatten().numpy(), expected_actions)
    expected_obs = rollout["observations"].transpose(1, 0, 2).reshape(n_steps * n_envs, -1)
    assert np.array_equal(data.observations.numpy(), expected_obs)
    # sequences: one per env plus one per episode start after an env's first step
    n_seq = n_envs + int(rollout["episode_starts"][1:].sum())
    assert data.lstm_states.pi[0].shape[1] == n_seq


def test_algorithm_conventions_save_load_aliases_and_optimizer(tmp_path):
    model = RecurrentA2C("RIMPolicy", "CartPoleNoVel-v1", n_steps=4, seed=0, policy_kwargs=dict(unit_size=8))
    assert isinstance(model.policy.optimizer, RMSpropBiasCorrected)
    assert model.policy.optimizer.defaults["eps"] == 1e-5 and model.policy.optimizer.defaults["betas"] == (0.0, 0.99)
    model.learn(64)
    assert model.iterations == 16
    model.save(tmp_path / "m.zip")
    loaded = ALGORITHMS["a2c"].load(tmp_path / "m.zip")
    assert loaded.iterations == 16 and loaded.policy.unit_size == 8
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True):
        assert th.equal(a, b)
    adam = RecurrentA2C("MlpLstmPolicy", "CartPoleNoVel-v1", use_rms_prop=False)
    assert type(adam.policy.optimizer) is th.optim.Adam


def test_rmsprop_steps_stay_at_the_learning_rate_under_a_steady_gradient_and_then_match_torch_rmsprop():
    """Under a steady gradient (what a coherent signal gives the gate weights of a recurrent core, update after
    update), the bias-corrected RMSprop moves each weight by the learning rate per step; torch's RMSprop, whose running
    average starts at 0, moves it by 10x, 7x, 5.8x ... the learning rate: what saturated the BabyAI cores. Once the
    average has warmed up, both take the same steps."""

    def moves(cls: type[th.optim.Optimizer], grads: th.Tensor) -> th.Tensor:
        w = th.zeros(grads.shape[1], requires_grad=True)
        opt = cls([w], lr=lr, alpha=0.99, eps=1e-5)
        out = []
        for g in grads:
            before = w.detach().clone()
            w.grad = g.clone()
            opt.step()
            out.append(w.detach() - before)
        return th.stack(out)

    lr = 1e-3
    steady = th.logspace(-3, 0, 50).repeat(10, 1)  # one scale per weight (>> eps), as across a network's layers
    corrected, plain = moves(RMSpropBiasCorrected, steady), moves(th.optim.RMSprop, steady)
    assert th.allclose(corrected, th.full_like(corrected, -lr), rtol=0.02)
    assert (plain[0] <= -9 * lr).all() and plain[:5].sum(0).max() <= -28 * lr  # 5 steps: ~30 lr each weight
    th.manual_seed(0)
    noisy = th.randn(2000, 50) * th.logspace(-4, 0, 50)
    late = slice(1900, 2000)  # alpha**1900 ~ 5e-9: the correction has vanished
    assert th.allclose(moves(RMSpropBiasCorrected, noisy)[late], moves(th.optim.RMSprop, noisy)[late], atol=1e-8)


def test_a2c_learns_cartpole_novel(tmp_path):
    """The shipped classic config with --algo a2c (RIM): within 100k steps, the mean of 20 greedy evaluation
    episodes reaches 150 (a random policy scores ~20); training stops there."""
    flags = {"policy": "rims", "algo": "a2c", "seed": 0, "wandb.mode": "disabled", "eval.stop_at": 150}
    cfg = resolve_config("CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", flags=flags)
    result = train(cfg, tmp_path)
    evals = np.load(tmp_path / "evaluations.npz")
    best = float(evals["results"].mean(axis=1).max())
    assert best >= 150, f"best periodic evaluation {best:.1f}; final {result.final_eval}"
