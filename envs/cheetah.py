"""Half-Cheetah seen from pixels, and joint perturbations: the imitation experiment of the paper (App. C.7, Table 6).

## Description

MuJoCo's ``HalfCheetah-v5`` (gymnasium), observed only through rendered frames: the policy sees the last
``frame_stack`` frames (4, as the paper), so the cheetah's velocities are hidden and must be inferred. Frames are
``size x size`` RGB (64 by default) from the model's ``track`` camera (it follows the centre of mass, so the cheetah
stays in view), rendered headless by MuJoCo's own ``mujoco.Renderer`` with shadows and reflections off (software
rendering: ~24 fps with them on, ~230-320 fps off, on this 2-core machine). Set ``MUJOCO_GL`` to pick the backend:
``egl`` (the default here when unset) or ``osmesa`` (``apt-get install libosmesa6``).

## Observation Space

``Box(0, 255, (size, size, 3 * frame_stack), uint8)``: the frames stacked on the channel axis, oldest first,
channel-last (SB3's image convention). At a reset the first frame fills the stack. ``info["state"]`` holds the
true state vector (``HalfCheetah-v5``'s 17-d observation), so an expert can act on the state while the frames are
recorded.

## Action Space, Rewards, Termination

As ``HalfCheetah-v5``: 6 torques in ``[-1, 1]``, forward reward minus control cost, 1000 steps, no termination.

## Perturbations

:class:`JointPerturbation` adds Gaussian noise to the joint angles (``qpos`` of the six actuated joints) and
optionally their velocities, at reset and/or every ``every`` steps, drawn from its own generator seeded by
``reset(seed=...)`` (reproducible by seed). The paper gives no scale; the ``perturbed`` preset (std 0.3 rad on the
joint angles at reset and every 50 steps) is our choice; its effect on the expert is measured in the README.

## Registered Configurations

* ``HalfCheetahPixels-v0``: no perturbation (the training distribution).
* ``HalfCheetahPixels-Perturbed-v0``: the ``perturbed`` preset.

``make_pixel_cheetah(perturb=...)`` takes a :class:`PerturbSettings` or a spec string ``none`` | ``joints`` |
``joints:SCALE`` (the preset's schedule with another std).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless rendering

CHEETAH_IDS = ("HalfCheetahPixels-v0", "HalfCheetahPixels-Perturbed-v0")
ACTUATED_JOINTS = ("bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot")


@dataclass(frozen=True)
class PerturbSettings:
    """Gaussian noise on joints: ``qpos_scale`` (rad) on angles, ``qvel_scale`` on velocities."""

    qpos_scale: float = 0.0
    qvel_scale: float = 0.0
    at_reset: bool = True
    every: int = 0  # also every N steps (0: never)
    joints: tuple[str, ...] = ACTUATED_JOINTS

    def __post_init__(self) -> None:
        if self.qpos_scale < 0 or self.qvel_scale < 0:
            raise ValueError(f"perturbation scales must be >= 0, got qpos {self.qpos_scale}, qvel {self.qvel_scale}")
        if self.every < 0:
            raise ValueError(f"perturbation 'every' must be >= 0 steps, got {self.every}")

    @property
    def active(self) -> bool:
        return (self.qpos_scale > 0 or self.qvel_scale > 0) and (self.at_reset or self.every > 0)


PERTURB_PRESETS: dict[str, PerturbSettings] = {
    "none": PerturbSettings(),
    "joints": PerturbSettings(qpos_scale=0.3, at_reset=True, every=50),
}
PERTURB_PRESETS["perturbed"] = PERTURB_PRESETS["joints"]


def parse_perturb(spec: str | PerturbSettings | None) -> PerturbSettings:
    """``none`` | ``joints`` | ``perturbed`` | ``joints:SCALE`` -> settings; ValueError naming the valid forms."""
    if spec is None:
        return PERTURB_PRESETS["none"]
    if isinstance(spec, PerturbSettings):
        return spec
    name, _, scale = spec.partition(":")
    valid = "none, joints, perturbed or joints:SCALE (joint-angle noise std in rad, e.g. joints:0.5)"
    if name not in PERTURB_PRESETS or (scale and name == "none"):
        raise ValueError(f"unknown perturbation '{spec}': valid are {valid}")
    settings = PERTURB_PRESETS[name]
    if scale:
        try:
            value = float(scale)
        except ValueError:
            raise ValueError(f"perturbation scale in '{spec}' is not a number: valid are {valid}") from None
        if not value >= 0:
            raise ValueError(f"perturbation scale in '{spec}' must be >= 0")
        settings = replace(settings, qpos_scale=value)
    return settings


class JointPerturbation(gym.Wrapper):
    """Gaussian noise on a MuJoCo env's joint positions (and velocities) at reset and/or every ``every`` steps.

    The noise comes from the wrapper's own generator, seeded from ``reset(seed=...)`` (so the same seed gives the
    same perturbations, and the wrapped env's own random stream is untouched). ``info["perturbed"]`` is True on the
    steps (and the reset) where noise was added; the returned observation is the perturbed state.
    """

    def __init__(self, env: gym.Env, settings: PerturbSettings) -> None:
        super().__init__(env)
        self.settings = settings
        model = env.unwrapped.model
        self._qpos_idx = np.array([model.joint(name).qposadr[0] for name in settings.joints])
        self._qvel_idx = np.array([model.joint(name).dofadr[0] for name in settings.joints])
        self._rng: np.random.Generator | None = None
        self._steps = 0

    def perturb(self) -> None:
        """Add one draw of noise to the current state (``set_state`` recomputes the derived quantities)."""
        assert self._rng is not None
        u = self.env.unwrapped
        qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
        s = self.settings
        qpos[self._qpos_idx] += s.qpos_scale * self._rng.standard_normal(len(self._qpos_idx))
        if s.qvel_scale > 0:
            qvel[self._qvel_idx] += s.qvel_scale * self._rng.standard_normal(len(self._qvel_idx))
        u.set_state(qpos, qvel)

    def _observation(self) -> np.ndarray:
        return self.env.unwrapped._get_obs()  # gymnasium's MuJoCo envs build their observation here

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        if seed is not None or self._rng is None:
            entropy = seed if seed is not None else int(self.env.unwrapped.np_random.integers(2**31))
            self._rng = np.random.default_rng([entropy, 0x5EED])
        self._steps = 0
        info["perturbed"] = False
        if self.settings.at_reset and self.settings.active:
            self.perturb()
            obs, info["perturbed"] = self._observation(), True
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._steps += 1
        info["perturbed"] = False
        if self.settings.every and self._steps % self.settings.every == 0 and self.settings.active:
            self.perturb()
            obs, info["perturbed"] = self._observation(), True
        return obs, reward, terminated, truncated, info


class FrameRenderer:
    """Offscreen RGB frames of a MuJoCo model from one camera, shadows and reflections off."""

    def __init__(self, model: Any, size: int = 64, camera: str = "track") -> None:
        import mujoco

        try:
            self._renderer = mujoco.Renderer(model, size, size)
        except Exception as err:  # no GL backend: say how to get one
            backend = os.environ.get("MUJOCO_GL", "")
            raise RuntimeError(
                f"MuJoCo cannot render headless with MUJOCO_GL={backend!r} ({err}); use MUJOCO_GL=egl, or "
                "MUJOCO_GL=osmesa after `apt-get install libosmesa6`"
            ) from None
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self.camera = camera

    def render(self, data: Any) -> np.ndarray:
        self._renderer.update_scene(data, camera=self.camera)
        return self._renderer.render()

    def close(self) -> None:
        self._renderer.close()


class PixelObservation(gym.Wrapper):
    """Replace a MuJoCo env's observation by its last ``frame_stack`` rendered frames (see the module docstring)."""

    def __init__(self, env: gym.Env, size: int = 64, frame_stack: int = 4, camera: str = "track") -> None:
        super().__init__(env)
        if size < 8 or frame_stack < 1:
            raise ValueError(f"size must be >= 8 and frame_stack >= 1, got size={size}, frame_stack={frame_stack}")
        self.size, self.frame_stack = size, frame_stack
        self._renderer = FrameRenderer(env.unwrapped.model, size, camera)
        self._frames: deque[np.ndarray] = deque(maxlen=frame_stack)
        self.observation_space = spaces.Box(0, 255, (size, size, 3 * frame_stack), np.uint8)

    def frame(self) -> np.ndarray:
        """The current frame, ``(size, size, 3)`` uint8."""
        return self._renderer.render(self.env.unwrapped.data)

    def _stacked(self) -> np.ndarray:
        return np.concatenate(list(self._frames), axis=-1)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        state, info = self.env.reset(seed=seed, options=options)
        frame = self.frame()
        self._frames.extend([frame] * self.frame_stack)
        info["state"] = state
        return self._stacked(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        state, reward, terminated, truncated, info = self.env.step(action)
        self._frames.append(self.frame())
        info["state"] = state
        return self._stacked(), reward, terminated, truncated, info

    def close(self) -> None:
        self._renderer.close()
        super().close()


def make_pixel_cheetah(
    size: int = 64,
    frame_stack: int = 4,
    perturb: str | PerturbSettings | None = None,
    camera: str = "track",
    **cheetah_kwargs: Any,
) -> gym.Env:
    """``HalfCheetah-v5`` (``cheetah_kwargs``) -> optional :class:`JointPerturbation` -> :class:`PixelObservation`."""
    env = gym.make("HalfCheetah-v5", **cheetah_kwargs)
    settings = parse_perturb(perturb)
    if settings.active:
        env = JointPerturbation(env, settings)
    return PixelObservation(env, size=size, frame_stack=frame_stack, camera=camera)


def register_cheetah() -> None:
    for env_id, perturb in zip(CHEETAH_IDS, ("none", "perturbed"), strict=True):
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="rims_rl.envs.cheetah:make_pixel_cheetah", kwargs={"perturb": perturb})
