"""``rims-rl activations``: play episodes with a trained RIM policy and show which units were active at each step.

For each episode, :func:`write_episode` writes to the output directory (by default ``RUN_DIR/analysis/<env>/``):

=========================  ==========================================================================================
``episode_<i>.png``        matplotlib figure: the activation mask (units x steps, episode starts are t = 0), each
                           unit's null attention, and the reward per step
``episode_<i>.gif``        image envs only: the frame the agent saw last (the newest of its stacked frames) with, at
                           its right, the activation mask of the last steps (the newest step in the rightmost
                           column); at most ``max_frames`` frames
``episodes.npz``           every episode's ``mask_<i>`` ``(T, K)``, ``null_attention_<i>`` ``(T, K)`` and
                           ``reward_<i>`` ``(T,)``
``summary.json``           per episode: return, length, each unit's activation rate and the winner-change rate
=========================  ==========================================================================================

The masks come from the same forward pass that chose each action (the policy's ``rim_info``), not from a second
pass. Atari games are played whole (no episode end at a life lost), as ``rims-rl evaluate`` plays them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.preprocessing import is_image_space

from rims_rl.agents.normalization import ObsStats
from rims_rl.envs import AtariSettings, make_env
from rims_rl.envs.atari import is_atari
from rims_rl.tracking import activation_heatmap

__all__ = ["EpisodeActivations", "play_episodes", "write_episode", "write_summary"]


@dataclass
class EpisodeActivations:
    """One episode as the RIM policy played it (``T`` steps, ``K`` units)."""

    mask: np.ndarray
    """``(T, K)`` bool: the units that won the input competition at each step."""
    null_attention: np.ndarray
    """``(T, K)`` float: each unit's attention on the null input (mean over heads)."""
    rewards: np.ndarray
    """``(T,)`` the reward after each step (unclipped, full game for Atari)."""
    frames: np.ndarray | None
    """``(T', H, W, 3)`` uint8 RGB, the frame the agent saw at each of the first ``T'`` steps (image envs)."""

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum())

    def summary(self) -> dict[str, Any]:
        changed = (self.mask[1:] != self.mask[:-1]).any(axis=-1)
        return {
            "return": self.episode_return,
            "length": len(self.rewards),
            "activation_rate": [round(float(r), 4) for r in self.mask.mean(axis=0)],
            "null_attention": [round(float(r), 4) for r in self.null_attention.mean(axis=0)],
            "winner_change_rate": round(float(changed.mean()), 4) if len(changed) else 0.0,
        }


def _image_key(space: spaces.Space) -> str | None:
    """The observation key holding an image (``""`` for a plain image space), or None."""
    if isinstance(space, spaces.Dict):
        return next((k for k, s in space.spaces.items() if is_image_space(s, check_channels=False)), None)
    return "" if is_image_space(space, check_channels=False) else None


def _frame(obs: np.ndarray) -> np.ndarray:
    """The newest frame of a (possibly stacked) image observation, as HxWx3 uint8."""
    arr = np.asarray(obs)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[0] < arr.shape[-1] and arr.shape[0] <= 12:  # channels first
        arr = np.moveaxis(arr, 0, -1)
    channels = arr.shape[-1]
    frame = arr[..., -3:] if channels % 3 == 0 else np.repeat(arr[..., -1:], 3, axis=-1)
    return np.ascontiguousarray(frame.astype(np.uint8))


def play_episodes(
    model: BaseAlgorithm,
    env_id: str,
    episodes: int = 1,
    *,
    seed: int = 0,
    deterministic: bool = True,
    efference_copy: bool = False,
    atari: AtariSettings | None = None,
    max_frames: int = 500,
    obs_stats: ObsStats | None = None,
) -> list[EpisodeActivations]:
    """Play ``episodes`` episodes one after the other in one env, keeping each step's activations.

    :param max_frames: keep the frames of at most this many steps per episode (image envs), for the GIF.
    :param obs_stats: the observation statistics the policy was trained with (``normalize_obs``), applied frozen.
    :raises ValueError: if the model's policy has no RIM.
    """
    policy = model.policy
    if not hasattr(policy, "rim_info"):
        raise ValueError(f"{type(policy).__name__} has no RIM: activations need a RIM policy")
    if is_atari(env_id):
        atari = (atari or AtariSettings()).full_games()
    env = make_env(env_id, n_envs=1, seed=seed, efference_copy=efference_copy, atari=atari)
    if obs_stats is not None:
        env = obs_stats.apply(env)
    key = _image_key(env.observation_space)
    out: list[EpisodeActivations] = []
    try:
        obs = env.reset()
        for _ in range(episodes):
            state, start = None, np.ones(1, dtype=bool)
            masks, nulls, rewards, frames = [], [], [], []
            done = False
            while not done:
                if key is not None and len(frames) < max_frames:
                    frames.append(_frame((obs[key] if key else obs)[0]))
                action, state = model.predict(obs, state=state, episode_start=start, deterministic=deterministic)
                info = policy.rim_info
                masks.append(info.activation_mask[-1, 0].cpu().numpy())
                nulls.append(info.input_attention[-1, 0, :, 0].cpu().numpy())
                obs, reward, dones, _ = env.step(action)  # Atari: whole games, unclipped rewards (full_games)
                rewards.append(float(reward[0]))
                done = bool(dones[0])
                start = np.zeros(1, dtype=bool)
            out.append(
                EpisodeActivations(
                    mask=np.stack(masks),
                    null_attention=np.stack(nulls).astype(np.float32),
                    rewards=np.asarray(rewards, dtype=np.float64),
                    frames=np.stack(frames) if frames else None,
                )
            )
    finally:
        env.close()
    return out


def _figure(ep: EpisodeActivations, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, units = ep.mask.shape
    fig, axes = plt.subplots(
        3, 1, figsize=(10, 1.2 + 0.5 * units * 2 + 1.2), sharex=True, layout="constrained",
        gridspec_kw={"height_ratios": [units, units, 2]},
    )  # fmt: skip
    extent = (-0.5, steps - 0.5, units - 0.5, -0.5)
    axes[0].imshow(ep.mask.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1, extent=extent)
    axes[0].set_ylabel("unit")
    axes[0].set_title("active units (bright)", fontsize=9, loc="left")
    image = axes[1].imshow(ep.null_attention.T, aspect="auto", interpolation="nearest", cmap="magma", extent=extent)
    axes[1].set_ylabel("unit")
    axes[1].set_title("attention on the null input (high: the unit ignores the input)", fontsize=9, loc="left")
    fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01, label="null attention")
    for ax in axes[:2]:
        ax.set_yticks(range(units))
    axes[2].plot(np.arange(steps), ep.rewards, lw=0.8, color="tab:green")
    axes[2].set_ylabel("reward")
    axes[2].set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    return fig


def _gif_frames(ep: EpisodeActivations, *, history: int = 64, scale: int = 2) -> list[Any]:
    from PIL import Image

    assert ep.frames is not None
    out = []
    for t, frame in enumerate(ep.frames):
        height = frame.shape[0] * scale
        picture = np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)
        lo = max(0, t + 1 - history)
        window = np.zeros((history, ep.mask.shape[1]), dtype=bool)
        window[history - (t + 1 - lo) :] = ep.mask[lo : t + 1]
        starts = np.zeros(history, dtype=bool)
        starts[history - (t + 1 - lo)] = lo == 0
        strip = np.asarray(
            Image.fromarray(activation_heatmap(window, starts, width=history * 2)).resize(
                (history * 2, height), Image.NEAREST
            )
        )
        gap = np.full((height, 4, 3), 255, dtype=np.uint8)
        out.append(Image.fromarray(np.concatenate([picture, gap, strip], axis=1)))
    return out


def write_episode(ep: EpisodeActivations, out_dir: Path, index: int, title: str) -> list[Path]:
    """Write ``episode_<index>.png`` (and ``.gif`` for image envs) to ``out_dir``; the paths written."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"episode_{index:03d}.png"
    fig = _figure(ep, f"{title}, episode {index}: return {ep.episode_return:g}, {len(ep.rewards)} steps")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    written = [png]
    if ep.frames is not None and len(ep.frames):
        gif = out_dir / f"episode_{index:03d}.gif"
        frames = _gif_frames(ep)
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0, optimize=False)
        written.append(gif)
    return written


def write_summary(episodes: list[EpisodeActivations], out_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """Write ``episodes.npz`` and ``summary.json`` (``meta`` plus one entry per episode) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for i, ep in enumerate(episodes):
        arrays[f"mask_{i}"] = ep.mask
        arrays[f"null_attention_{i}"] = ep.null_attention.astype(np.float16)
        arrays[f"reward_{i}"] = ep.rewards
    npz = out_dir / "episodes.npz"
    np.savez_compressed(npz, **arrays)
    summary = out_dir / "summary.json"
    summary.write_text(json.dumps({**meta, "episodes": [ep.summary() for ep in episodes]}, indent=2) + "\n")
    return [npz, summary]
