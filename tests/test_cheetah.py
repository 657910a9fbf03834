"""Pixel Half-Cheetah (envs/cheetah.py): headless rendering, frame stacking, joint perturbations."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import rims_rl.envs  # noqa: F401  (registers the ids)
from rims_rl.envs.cheetah import (
    ACTUATED_JOINTS,
    PERTURB_PRESETS,
    JointPerturbation,
    PerturbSettings,
    make_pixel_cheetah,
    parse_perturb,
)


def test_frames_render_headless_and_change_as_the_cheetah_moves():
    env = gym.make("HalfCheetahPixels-v0")
    obs, info = env.reset(seed=0)
    assert obs.shape == (64, 64, 12) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    assert info["state"].shape == (17,)
    # At a reset the first frame fills the stack.
    for k in range(1, 4):
        np.testing.assert_array_equal(obs[..., 3 * k : 3 * k + 3], obs[..., :3])
    assert obs[..., :3].std() > 10  # a real picture, not a blank buffer
    first = obs[..., -3:].copy()
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs, *_ = env.step(rng.uniform(-1, 1, 6))
    assert np.abs(obs[..., -3:].astype(int) - first).mean() > 1.0  # the pose changed, so did the picture
    # The stack is the last four frames, oldest first.
    previous = obs.copy()
    obs, *_ = env.step(rng.uniform(-1, 1, 6))
    np.testing.assert_array_equal(obs[..., :9], previous[..., 3:])
    env.close()


def _joint_qpos(env: gym.Env) -> np.ndarray:
    model, data = env.unwrapped.model, env.unwrapped.data
    return np.array([data.qpos[model.joint(j).qposadr[0]] for j in ACTUATED_JOINTS])


def test_perturbation_moves_only_the_joints_by_the_requested_scale():
    scale = 0.4
    plain = gym.make("HalfCheetah-v5")
    noisy = JointPerturbation(gym.make("HalfCheetah-v5"), PerturbSettings(qpos_scale=scale))
    diffs = []
    for seed in range(300):
        plain.reset(seed=seed)
        noisy.reset(seed=seed)
        qa, qb = plain.unwrapped.data.qpos, noisy.unwrapped.data.qpos
        root = [0, 1, 2]  # rootx, rootz, rooty are not joints of the body: untouched
        np.testing.assert_array_equal(qa[root], qb[root])
        diffs.append(_joint_qpos(noisy) - _joint_qpos(plain))
    diffs = np.array(diffs)
    assert diffs.shape == (300, 6)
    assert abs(diffs.std() - scale) < 0.1 * scale
    assert abs(diffs.mean()) < 0.1 * scale


def test_perturbation_every_n_steps_and_reproducible_by_seed():
    settings = PerturbSettings(qpos_scale=0.3, qvel_scale=1.0, at_reset=False, every=5)

    def trace(seed: int) -> tuple[np.ndarray, list[bool]]:
        env = JointPerturbation(gym.make("HalfCheetah-v5"), settings)
        obs, info = env.reset(seed=seed)
        assert not info["perturbed"]
        states, flags = [obs], []
        for _ in range(12):
            obs, _, _, _, info = env.step(np.zeros(6))
            states.append(obs)
            flags.append(info["perturbed"])
        return np.array(states), flags

    a, flags = trace(3)
    b, _ = trace(3)
    c, _ = trace(4)
    assert flags == [(i + 1) % 5 == 0 for i in range(12)]
    np.testing.assert_array_equal(a, b)  # same seed, same perturbations
    assert not np.allclose(a, c)
    # The returned observation is the perturbed state: the joint angles jump at the perturbed step.
    plain = gym.make("HalfCheetah-v5")
    plain.reset(seed=3)
    ref = [plain.step(np.zeros(6))[0] for _ in range(5)]
    np.testing.assert_allclose(a[4], ref[3])
    assert np.abs(a[5][1:7] - ref[4][1:7]).max() > 0.05


def test_perturb_specs():
    assert not parse_perturb("none").active
    assert parse_perturb("joints") == PERTURB_PRESETS["joints"] == parse_perturb("perturbed")
    assert parse_perturb("joints:0.7").qpos_scale == 0.7
    assert parse_perturb("joints:0.7").every == PERTURB_PRESETS["joints"].every
    for bad in ("noise", "joints:x", "joints:-1", "none:0.2"):
        with pytest.raises(ValueError, match=r"valid|must be"):
            parse_perturb(bad)


def test_perturbed_pixel_env_differs_from_plain_with_the_same_seed():
    plain = make_pixel_cheetah()
    noisy = gym.make("HalfCheetahPixels-Perturbed-v0")
    a, _ = plain.reset(seed=1)
    b, info = noisy.reset(seed=1)
    assert info["perturbed"]
    assert np.abs(a.astype(int) - b).mean() > 0.5
    plain.close()
    noisy.close()
