"""Behaviour cloning from pixels (paper App. C.7, Table 6): demonstrations, the recurrent pixel policy, training with
truncated back-propagation through time, and evaluation with and without joint perturbations.

Demonstrations (``rims-rl demos``) are one compressed ``.npz``: ``frames`` ``(N, S, S, 3)`` uint8 (the frame seen
before each action, all episodes one after the other), ``actions`` ``(N, A)``, ``rewards`` ``(N,)``, ``states``
``(N, 17)`` (the true state the expert acted on), ``episode_lengths`` ``(E,)``, ``episode_returns`` ``(E,)`` and
``meta`` (JSON: env, frame size, camera, expert, seeds). Frames are stored once; the 4-frame stacks the policy sees
are built from them when batches are drawn, exactly as :class:`rims_rl.envs.cheetah.PixelObservation` builds them.

The policy (:class:`PixelPolicy`): the World Models encoder (Ha & Schmidhuber 2018: four 4x4 stride-2 convolutions,
32-64-128-256 channels, ReLU; 1024 features at 64x64) on the stacked frames, a recurrent core (a RIM, a GRU or an
LSTM), and two 256-unit ReLU layers to a tanh action (the paper's "two fully connected layers of size 256").

Training (:func:`train_imitation`) runs ``batch_size`` training episodes side by side, each cut into consecutive
windows of ``seq_len`` steps: one Adam step per window on the mean squared error to the expert's actions, the
recurrent state carried from window to window and detached (truncated BPTT). The validation loss is the same error
on held-out episodes, played whole with the state carried. ``augment: shift`` moves each training window's frames
by a random offset (:func:`random_shift`). With ``dagger.rounds`` > 0 (the shipped config; not the paper's) the
``epochs`` of behaviour cloning are followed by DAgger rounds (:mod:`rims_rl.agents.dagger`): the clone drives,
the expert labels, the played episodes join the training set, ``dagger.epochs`` more epochs run. A run directory
holds ``config.yaml``, ``run.json``, ``progress.csv`` (one row per epoch), ``checkpoint.pt`` (the newest epoch:
model, optimizer, RNG; ``--resume``), ``dagger.npz`` (the played episodes), ``model.pt`` (the final policy),
``eval.json`` and ``perturb.json`` (``rims-rl evaluate --perturb``), and the W&B run (offline unless chosen
otherwise).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import yaml
from torch import nn

from rims_rl.config import SHIPPED_EXPERT, ImitationConfig
from rims_rl.rim import RIM

__all__ = [
    "Demos",
    "ImitationInterrupted",
    "PerturbResult",
    "PixelPolicy",
    "evaluate_pixel_policy",
    "load_demos",
    "load_imitation_run",
    "record_demos",
    "record_perturb",
    "train_imitation",
]

DEMO_KEYS = ("frames", "actions", "rewards", "states", "episode_lengths", "episode_returns")


# ================================================================================================================
# Demonstrations
# ================================================================================================================
@dataclass
class Demos:
    frames: np.ndarray  # (N, S, S, 3) uint8
    actions: np.ndarray  # (N, A) float32
    rewards: np.ndarray  # (N,)
    states: np.ndarray  # (N, state dim)
    episode_lengths: np.ndarray  # (E,)
    episode_returns: np.ndarray  # (E,)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def episodes(self) -> int:
        return len(self.episode_lengths)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.episode_lengths)[:-1]]).astype(np.int64)

    def subset(self, episodes: np.ndarray) -> Demos:
        """The demonstrations of ``episodes`` (indices, in that order)."""
        starts, lengths = self.starts[episodes], self.episode_lengths[episodes]
        steps = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        per_step = {k: getattr(self, k)[steps] for k in ("frames", "actions", "rewards", "states")}
        return Demos(**per_step, episode_lengths=lengths, episode_returns=self.episode_returns[episodes],
                     meta=dict(self.meta))  # fmt: skip

    def concat(self, other: Any) -> Demos:
        """These episodes, then ``other``'s (a :class:`Demos` or :class:`rims_rl.agents.dagger.Played`)."""
        return Demos(**{k: np.concatenate([getattr(self, k), getattr(other, k)]) for k in DEMO_KEYS},
                     meta=dict(self.meta))  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Compressed ``.npz``, written beside and renamed over ``path`` (never half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays = {k: getattr(self, k) for k in DEMO_KEYS}
        np.savez_compressed(tmp, meta=np.array(json.dumps(self.meta)), **arrays)
        tmp.replace(path)
        return path


def load_demos(path: str | Path) -> Demos:
    """Read a file written by ``rims-rl demos``; ValueError naming what is missing or inconsistent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no demonstrations file {path} (write one with `rims-rl demos`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in (*DEMO_KEYS, "meta") if k not in data]
            if missing:
                raise ValueError(f"{path} is not a demonstrations file: it lacks {', '.join(missing)}")
            demos = Demos(**{k: data[k] for k in DEMO_KEYS}, meta=json.loads(str(data["meta"])))
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz demonstrations file ({err})") from None
    n = int(demos.episode_lengths.sum())
    if not (len(demos.frames) == len(demos.actions) == len(demos.rewards) == n) or demos.episodes == 0:
        raise ValueError(f"{path}: frames/actions/rewards do not match the episode lengths")
    return demos


def record_demos(
    expert_path: str | Path,
    episodes: int,
    *,
    seed: int = 0,
    size: int = 64,
    camera: str = "track",
    max_steps: int | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Demos:
    """Play the expert (on the true state) in the pixel env and record each step's frame, action and reward.

    Episodes are seeded ``seed, seed + 1, ...``. A KeyboardInterrupt keeps the finished episodes (the
    partial one is dropped) and returns them, with ``meta["interrupted"] = True``.
    """
    from rims_rl.agents.experts import load_expert
    from rims_rl.envs.cheetah import make_pixel_cheetah

    actor = load_expert(expert_path)
    kwargs = {"max_episode_steps": max_steps} if max_steps else {}
    env = make_pixel_cheetah(size=size, frame_stack=1, camera=camera, **kwargs)
    frames, actions, rewards, states, lengths, returns = [], [], [], [], [], []
    interrupted = False
    try:
        for episode in range(episodes):
            obs, info = env.reset(seed=seed + episode)
            ep: dict[str, list] = {"f": [], "a": [], "r": [], "s": []}
            done = False
            while not done:
                state = info["state"]
                with th.no_grad():
                    action, _ = actor.predict(state, deterministic=True)
                ep["f"].append(obs)
                ep["s"].append(state)
                ep["a"].append(action)
                obs, reward, terminated, truncated, info = env.step(action)
                ep["r"].append(reward)
                done = terminated or truncated
            frames += ep["f"]
            actions += ep["a"]
            rewards += ep["r"]
            states += ep["s"]
            lengths.append(len(ep["r"]))
            returns.append(float(np.sum(ep["r"])))
            if progress is not None:
                progress(episode + 1, returns[-1])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        env.close()
    if not lengths:
        raise KeyboardInterrupt
    meta = {
        "env": "HalfCheetah-v5",
        "size": size,
        "camera": camera,
        "expert": str(expert_path),
        "seed": seed,
        "max_steps": max_steps,
        "interrupted": interrupted,
    }
    return Demos(
        frames=np.stack(frames).astype(np.uint8),
        actions=np.stack(actions).astype(np.float32),
        rewards=np.asarray(rewards, np.float32),
        states=np.stack(states).astype(np.float32),
        episode_lengths=np.asarray(lengths, np.int64),
        episode_returns=np.asarray(returns, np.float64),
        meta=meta,
    )


def stack_index(length: int, frame_stack: int) -> np.ndarray:
    """``(length, frame_stack)`` frame indices of each step's stack, oldest first; the first frame fills the start."""
    t = np.arange(length)[:, None] + np.arange(frame_stack)[None, :] - (frame_stack - 1)
    return np.maximum(t, 0)


# ================================================================================================================
# The policy
# ================================================================================================================
class WorldModelsEncoder(nn.Module):
    """Ha & Schmidhuber's (2018) VAE encoder without the sampling: 4x4 stride-2 convs, 32-64-128-256, ReLU."""

    def __init__(self, in_channels: int, size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out in (32, 64, 128, 256):
            layers += [nn.Conv2d(channels, out, 4, stride=2), nn.ReLU()]
            channels = out
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.norm: nn.Module = nn.Identity()
        for layer in self.net:
            # Orthogonal with ReLU gain, as SB3 initialises its CNNs. PyTorch's default init shrinks the activations
            # at every ReLU layer: after four, features were ~1e-2, too small for a RIM's input attention to tell
            # inputs apart (the same units won at every step and behaviour cloning did not move off the mean action).
            if isinstance(layer, nn.Conv2d):
                nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
                nn.init.zeros_(layer.bias)
        with th.no_grad():
            self.features_dim = int(self.net(th.zeros(1, in_channels, size, size)).shape[1])
        self.norm = nn.LayerNorm(self.features_dim)

    def forward(self, images: th.Tensor) -> th.Tensor:
        """``(B, S, S, C)`` uint8 channel-last -> ``(B, features_dim)``."""
        return self.norm(self.net(images.permute(0, 3, 1, 2).float() / 255.0))


class PixelPolicy(nn.Module):
    """Stacked frames -> World Models encoder -> RIM | GRU | LSTM -> two ReLU layers -> tanh action.

    Inputs: ``obs`` ``(L, B, S, S, 3 * frame_stack)`` uint8, optional ``state`` (a pair of ``(B, hidden)``
    tensors; GRUs ignore the second), optional ``episode_starts`` ``(L, B)`` (reset the state before those steps).
    Outputs: actions ``(L, B, A)`` in ``[-1, 1]``, the state after the last step, and the RIM's activation masks
    ``(L, B, K)`` (None for GRU/LSTM).
    """

    def __init__(self, cfg: ImitationConfig, *, size: int, frame_stack: int, action_dim: int) -> None:
        super().__init__()
        self.kind = cfg.policy
        self.size, self.frame_stack, self.action_dim = size, frame_stack, action_dim
        self.encoder = WorldModelsEncoder(3 * frame_stack, size)
        d = self.encoder.features_dim
        self.core: nn.Module
        if cfg.policy == "rims":
            r = cfg.rim
            self.core = RIM(d, r.num_units, r.unit_size, r.k_active, r.cell, **r.rim_kwargs())
            self.hidden_size = r.num_units * r.unit_size
        else:
            cls = nn.GRU if cfg.policy == "gru" else nn.LSTM
            self.core = cls(d, cfg.hidden_size)
            self.hidden_size = cfg.hidden_size
        w = cfg.head_size
        self.head = nn.Sequential(
            nn.Linear(self.hidden_size, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, action_dim), nn.Tanh()
        )

    def initial_state(self, batch: int, device: th.device | str) -> tuple[th.Tensor, th.Tensor]:
        h = th.zeros(batch, self.hidden_size, device=device)
        return h, th.zeros_like(h)

    def forward(
        self,
        obs: th.Tensor,
        state: tuple[th.Tensor, th.Tensor] | None = None,
        episode_starts: th.Tensor | None = None,
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor], th.Tensor | None]:
        L, B = obs.shape[:2]
        x = self.encoder(obs.reshape(L * B, *obs.shape[2:])).view(L, B, -1)
        if state is None:
            state = self.initial_state(B, obs.device)
        masks = None
        if isinstance(self.core, RIM):
            out, state, info = self.core(x, state, episode_starts)
            masks = info.activation_mask
        else:
            out, state = self._torch_rnn(x, state, episode_starts)
        return self.head(out), state, masks

    def _torch_rnn(
        self, x: th.Tensor, state: tuple[th.Tensor, th.Tensor], starts: th.Tensor | None
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        h, c = state
        lstm = isinstance(self.core, nn.LSTM)

        def run(xs: th.Tensor, h: th.Tensor, c: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
            if lstm:
                out, (h1, c1) = self.core(xs, (h[None], c[None]))
                return out, h1[0], c1[0]
            out, h1 = self.core(xs, h[None])
            return out, h1[0], c

        if starts is None or not bool(starts[1:].any()):  # one cuDNN/MKL call for the whole sequence
            if starts is not None:
                keep = (1.0 - starts[0].float())[:, None]
                h, c = h * keep, c * keep
            out, h, c = run(x, h, c)
            return out, (h, c)
        outs = []
        for t in range(x.shape[0]):  # resets inside the sequence: step by step
            keep = (1.0 - starts[t].float())[:, None]
            o, h, c = run(x[t : t + 1], h * keep, c * keep)
            outs.append(o)
        return th.cat(outs), (h, c)


# ================================================================================================================
# Training
# ================================================================================================================
class ImitationInterrupted(Exception):
    def __init__(self, run_dir: Path, epoch: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}; the last finished epoch ({epoch}) is saved in {run_dir}")
        self.run_dir, self.epoch, self.signal_name = run_dir, epoch, signal_name


def _device(name: str) -> th.device:
    if name == "auto":
        return th.device("cuda" if th.cuda.is_available() else "cpu")
    return th.device(name)


class _Batches:
    """Frames of all episodes on the training device and the windows of truncated BPTT."""

    def __init__(self, demos: Demos, episodes: np.ndarray, frame_stack: int, device: th.device) -> None:
        self.device = device
        self.frames = th.from_numpy(demos.frames).to(device)
        self.actions = th.from_numpy(demos.actions).to(device)
        self.starts = demos.starts[episodes]
        self.lengths = demos.episode_lengths[episodes]
        self.n = len(episodes)
        self.frame_stack = frame_stack

    def window(self, eps: np.ndarray, t0: int, seq_len: int) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Steps ``t0 .. t0 + seq_len`` of episodes ``eps`` (indices into this split): obs ``(L, B, S, S, C)``,
        target actions ``(L, B, A)`` and a validity mask ``(L, B)`` (episodes shorter than the window are padded)."""
        L = seq_len
        t = t0 + np.arange(L)[:, None]  # (L, 1)
        valid = t < self.lengths[eps][None, :]  # (L, B)
        t = np.minimum(t, self.lengths[eps][None, :] - 1)
        stack = np.maximum(t[..., None] + np.arange(self.frame_stack) - (self.frame_stack - 1), 0)  # (L, B, F)
        frame_idx = th.from_numpy(self.starts[eps][None, :, None] + stack).to(self.device)
        step_idx = th.from_numpy(self.starts[eps][None, :] + t).to(self.device)
        frames = self.frames[frame_idx]  # (L, B, F, S, S, 3)
        obs = frames.permute(0, 1, 3, 4, 2, 5).reshape(L, len(eps), *frames.shape[3:5], -1)
        return obs, self.actions[step_idx], th.from_numpy(valid).to(self.device)


def random_shift(obs: th.Tensor, pad: int) -> th.Tensor:
    """DrQ's random shift (Kostrikov et al., 2020) for sequences: each episode's window ``(L, B, S, S, C)`` is padded
    by ``pad`` pixels (edge pixels repeated) and cropped back to ``S x S`` at one random offset per episode, the same
    for all its steps and stacked frames (so the motion between frames is kept). Uses torch's global generator."""
    L, B, S, _, C = obs.shape
    x = obs.permute(1, 0, 4, 2, 3).reshape(B, L * C, S, S).float()
    x = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = th.randint(0, 2 * pad + 1, (B, 2)).tolist()
    crops = th.stack([x[b, :, dy : dy + S, dx : dx + S] for b, (dy, dx) in enumerate(offsets)])
    return crops.view(B, L, C, S, S).permute(1, 0, 3, 4, 2).to(obs.dtype)


def _masked_mse(pred: th.Tensor, target: th.Tensor, valid: th.Tensor) -> th.Tensor:
    err = ((pred - target) ** 2).mean(-1)
    return (err * valid).sum() / valid.sum().clamp(min=1)


def _sweep(
    policy: PixelPolicy,
    batches: _Batches,
    eps: np.ndarray,
    seq_len: int,
    step: Callable[[th.Tensor], None] | None,
    shift_pad: int = 0,
) -> tuple[float, int]:
    """One pass over episodes ``eps`` side by side in windows; ``step(loss)`` after each window when training;
    ``shift_pad`` > 0: :func:`random_shift` the frames. Returns the step-weighted mean loss and the window count."""
    state = policy.initial_state(len(eps), batches.device)
    total, count, windows = 0.0, 0, 0
    for t0 in range(0, int(batches.lengths[eps].max()), seq_len):
        obs, target, valid = batches.window(eps, t0, seq_len)
        if shift_pad:
            obs = random_shift(obs, shift_pad)
        pred, state, _ = policy(obs, state)
        loss = _masked_mse(pred, target, valid)
        if step is not None:
            step(loss)
        state = (state[0].detach(), state[1].detach())  # truncated BPTT
        n = int(valid.sum())
        total += float(loss.detach()) * n
        count += n
        windows += 1
    return total / max(count, 1), windows


def _policy_for(cfg: ImitationConfig, meta: dict[str, Any]) -> PixelPolicy:
    return PixelPolicy(cfg, size=meta["size"], frame_stack=meta["frame_stack"], action_dim=meta["action_dim"])


def train_imitation(
    cfg: ImitationConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    stop: Any | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) a pixel policy by behaviour cloning into ``run_dir``.

    ``stop`` is an object with a ``requested`` attribute (``callbacks.GracefulStop``); when it is set the
    current epoch is abandoned and :class:`ImitationInterrupted` is raised (finished epochs are in the checkpoint).
    Returns the final summary (also in ``run.json``).
    """
    from rims_rl.agents.training import _write_json
    from rims_rl.tracking import finish_wandb

    session = _ImitationSession(cfg, run_dir, resume)
    info, wandb_run = session.info, session.start_wandb()
    try:
        while session.epoch < cfg.total_epochs:
            session.play_dagger_rounds(stop)
            row = session.train_epoch(stop)
            session.save()
            if wandb_run is not None:
                wandb_run.log({f"imitation/{k}": v for k, v in row.items() if k != "epoch"}, step=session.epoch)
            if on_epoch is not None:
                on_epoch(row)
        th.save({"policy": session.policy.state_dict(), "config": cfg.model_dump(), "meta": session.meta},
                run_dir / "model.pt")  # fmt: skip
        history = session.history
        info.update(status="finished", epochs=session.epoch, final=history[-1] if history else {})
        _write_json(run_dir / "run.json", info)
    except ImitationInterrupted:
        info.update(status="interrupted", epochs=session.epoch)
        _write_json(run_dir / "run.json", info)
        raise
    finally:
        if wandb_run is not None:  # a stopped run does not wait long for a W&B service that Ctrl-C took down
            finish_wandb(wandb_run, wait_s=60.0 if info.get("status") == "finished" else 5.0)
    return info


class _ImitationSession:
    """The state of a behaviour-cloning run: demos split into training and validation episodes, the policy, its
    optimiser, the epoch count, history and RNGs (restored from ``checkpoint.pt`` on resume)."""

    FIELDS = ("epoch", "updates", "episodes", "train_loss", "val_loss", "grad_norm", "grad_norm_max", "seqs_per_s",
              "steps_per_s", "seconds", "dagger_round", "dagger_return")  # fmt: skip

    def __init__(self, cfg: ImitationConfig, run_dir: Path, resume: bool) -> None:
        from rims_rl.agents.training import _write_json

        self.cfg, self.run_dir = cfg, run_dir
        demos = load_demos(cfg.demos)
        self.meta = {
            "size": int(demos.meta.get("size", demos.frames.shape[1])),
            "frame_stack": cfg.frame_stack,
            "action_dim": int(demos.actions.shape[1]),
            "camera": demos.meta.get("camera", "track"),
        }
        self.n_train = demos.episodes - cfg.val_episodes
        if self.n_train < 1:
            raise ValueError(
                f"val_episodes={cfg.val_episodes} leaves no training episode in {cfg.demos} ({demos.episodes} episodes)"
            )
        self.demos = demos.subset(np.arange(self.n_train))
        device = self.device = _device(cfg.device)
        th.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.policy = _policy_for(cfg, self.meta).to(device)
        self.optimizer = th.optim.Adam(self.policy.parameters(), lr=cfg.learning_rate)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.epoch, self.history, self.info = 0, [], {}
        self.played: Demos | None = None  # DAgger's episodes so far (dagger.npz)
        self.dagger_rounds, self.dagger_return = 0, math.nan
        if resume:
            self._load()
        else:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        self._set_training_data()
        held_out = np.arange(self.n_train, demos.episodes)
        self.val_b = _Batches(demos, held_out, cfg.frame_stack, device) if cfg.val_episodes else None
        self.info.update(
            kind="imitation", status="running", policy=cfg.policy, demos=str(cfg.demos), meta=self.meta,
            core_parameters=sum(p.numel() for p in self.policy.core.parameters()),
            parameters=sum(p.numel() for p in self.policy.parameters()),
        )  # fmt: skip
        _write_json(run_dir / "run.json", self.info)

    def start_wandb(self) -> Any:
        """The W&B run (continued on resume), its id kept in run.json."""
        from rims_rl.agents.training import _write_json
        from rims_rl.tracking import start_wandb

        cfg = self.cfg
        tags = [cfg.policy, "imitation"] + ([f"k_active={cfg.rim.k_active}"] if cfg.policy == "rims" else [])
        wandb_run = start_wandb(
            cfg.wandb.mode, self.run_dir, cfg.model_dump(), project=cfg.wandb.project, entity=cfg.wandb.entity,
            group=cfg.wandb.group or "HalfCheetahPixels-imitation", job_type=cfg.policy, tags=tags + cfg.wandb.tags,
            name=self.run_dir.name, run_id=self.info.get("wandb_id"),
        )  # fmt: skip
        if wandb_run is not None:
            self.info["wandb_id"] = wandb_run.id
            _write_json(self.run_dir / "run.json", self.info)
        return wandb_run

    def _set_training_data(self) -> None:
        data = self.demos if self.played is None else self.demos.concat(self.played)
        self.train_b = _Batches(data, np.arange(data.episodes), self.cfg.frame_stack, self.device)

    def play_dagger_rounds(self, stop: Any | None) -> None:
        """Play the DAgger rounds due before the next epoch (:class:`rims_rl.config.DaggerConfig`): the clone's
        episodes, labelled by the expert, join the training set and ``dagger.npz`` (written whole, for resume)."""
        from rims_rl.agents.dagger import play_and_label

        cfg, d = self.cfg, self.cfg.dagger
        while self.dagger_rounds < cfg.dagger_round_due(self.epoch):
            r = self.dagger_rounds + 1

            def check() -> None:
                if stop is not None and stop.requested:
                    raise ImitationInterrupted(self.run_dir, self.epoch, getattr(stop, "signal_name", "a signal"))

            played = play_and_label(
                self._acting(), d.expert or SHIPPED_EXPERT, episodes=d.episodes, beta=d.beta**r,
                seed=1_000_000 + 10_000 * cfg.seed + d.episodes * (r - 1), size=self.meta["size"],
                frame_stack=cfg.frame_stack, camera=self.meta["camera"], max_steps=d.max_steps, check=check,
            )  # fmt: skip
            played_demos = Demos(**{k: getattr(played, k) for k in DEMO_KEYS}, meta={"dagger_rounds": r})
            self.played = played_demos if self.played is None else self.played.concat(played_demos)
            self.played.meta = {"dagger_rounds": r}
            self.played.save(self.run_dir / "dagger.npz")
            self.dagger_rounds, self.dagger_return = r, float(played.episode_returns.mean())
            self._set_training_data()

    def _acting(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """The policy as DAgger's ``act(obs, starts)``: greedy actions, the recurrent state carried between calls."""
        policy, state = self.policy, None

        def act(obs: np.ndarray, starts: np.ndarray) -> np.ndarray:
            nonlocal state
            policy.eval()
            with th.no_grad():
                x = th.as_tensor(obs, device=self.device)[None]
                reset = th.as_tensor(starts, device=self.device)[None]
                action, state, _ = policy(x, state, reset)
            return action[0].cpu().numpy()

        return act

    def train_epoch(self, stop: Any | None) -> dict[str, Any]:
        """One pass over the training episodes (in a random order, ``batch_size`` side by side), then the
        validation loss; the epoch's row is appended to the history and returned."""
        cfg, policy = self.cfg, self.policy

        def update(loss: th.Tensor) -> None:
            if stop is not None and stop.requested:
                raise ImitationInterrupted(self.run_dir, self.epoch, getattr(stop, "signal_name", "a signal"))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norms.append(float(nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)))
            self.optimizer.step()

        n_train = self.train_b.n
        order = self.rng.permutation(n_train)
        start = time.perf_counter()
        policy.train()
        losses, weights, windows, grad_norms = [], [], 0, []
        shift = cfg.shift_pad if cfg.augment == "shift" else 0
        for i in range(0, n_train, cfg.batch_size):
            eps = order[i : i + cfg.batch_size]
            loss, n = _sweep(policy, self.train_b, eps, cfg.seq_len, update, shift)
            losses.append(loss)
            weights.append(int(self.train_b.lengths[eps].sum()))
            windows += n * len(eps)
        seconds = time.perf_counter() - start
        val_loss = math.nan
        if self.val_b is not None:
            policy.eval()
            with th.no_grad():
                val_loss, _ = _sweep(policy, self.val_b, np.arange(cfg.val_episodes), cfg.seq_len, None)
        self.epoch += 1
        updates = windows // min(cfg.batch_size, n_train)
        row = {
            "epoch": self.epoch,
            "updates": (self.history[-1]["updates"] if self.history else 0) + updates,
            "episodes": n_train,
            "train_loss": float(np.average(losses, weights=weights)),
            "val_loss": float(val_loss),
            "grad_norm": float(np.median(grad_norms)) if grad_norms else math.nan,  # before clipping
            "grad_norm_max": max(grad_norms, default=math.nan),
            "seqs_per_s": windows / seconds,
            "steps_per_s": float(self.train_b.lengths.sum()) / seconds,
            "seconds": seconds,
            "dagger_round": self.dagger_rounds,
            "dagger_return": self.dagger_return,
        }
        self.dagger_return = math.nan  # reported once, on the epoch after its round
        self.history.append(row)
        return row

    def save(self) -> None:
        """``checkpoint.pt`` (written whole or not at all) and ``progress.csv``, after every epoch."""
        ckpt = {
            "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
            "history": self.history, "numpy_rng": self.rng.bit_generator.state, "torch_rng": th.get_rng_state(),
        }  # fmt: skip
        th.save(ckpt, self.run_dir / "checkpoint.tmp.pt")
        (self.run_dir / "checkpoint.tmp.pt").replace(self.run_dir / "checkpoint.pt")
        with open(self.run_dir / "progress.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(self.history)

    def _load(self) -> None:
        ckpt = th.load(self.run_dir / "checkpoint.pt", map_location=next(self.policy.parameters()).device,
                       weights_only=False)  # fmt: skip
        self.policy.load_state_dict(ckpt["policy"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.epoch, self.history = ckpt["epoch"], ckpt["history"]
        self.rng.bit_generator.state = ckpt["numpy_rng"]
        th.set_rng_state(ckpt["torch_rng"])
        self.info = json.loads((self.run_dir / "run.json").read_text())
        # A round whose epochs were not checkpointed yet is kept (dagger.npz is written when the round ends): the
        # clone that played it is the checkpoint's, so replaying it would give the same episodes.
        if (self.run_dir / "dagger.npz").is_file():
            self.played = load_demos(self.run_dir / "dagger.npz")
            self.dagger_rounds = int(self.played.meta["dagger_rounds"])


def load_imitation_run(run_dir: str | Path, device: str = "cpu") -> tuple[ImitationConfig, PixelPolicy]:
    """The config and the final policy (``model.pt``; the newest checkpoint if the run did not finish)."""
    run_dir = Path(run_dir)
    cfg = ImitationConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    info = json.loads((run_dir / "run.json").read_text())
    policy = _policy_for(cfg, info["meta"])
    file = run_dir / "model.pt" if (run_dir / "model.pt").is_file() else run_dir / "checkpoint.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{run_dir} has neither model.pt nor checkpoint.pt: no finished epoch yet")
    state = th.load(file, map_location=_device(device), weights_only=False)["policy"]
    policy.load_state_dict(state)
    policy.to(_device(device)).eval()
    return cfg, policy


# ================================================================================================================
# Evaluation
# ================================================================================================================
@dataclass
class PerturbResult:
    perturb: str
    episodes: int
    mean_return: float
    std_return: float
    returns: list[float] = field(repr=False)
    seed: int = 0
    unit_activity: list[float] | None = None  # a RIM's fraction of steps each unit was active (None: GRU/LSTM)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_pixel_policy(
    policy: PixelPolicy,
    *,
    perturb: str = "none",
    episodes: int = 3,
    seed: int = 0,
    max_steps: int | None = None,
) -> PerturbResult:
    """Whole episodes of the pixel env (``perturb`` as :func:`rims_rl.envs.cheetah.parse_perturb`), seeded ``seed + i``,
    the policy's state carried from step to step; the return is the env's reward summed over the episode."""
    from rims_rl.envs.cheetah import make_pixel_cheetah

    device = next(policy.parameters()).device
    kwargs = {"max_episode_steps": max_steps} if max_steps else {}
    env = make_pixel_cheetah(size=policy.size, frame_stack=policy.frame_stack, perturb=perturb, **kwargs)
    returns: list[float] = []
    active, steps = 0.0, 0
    policy.eval()
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            state, total, done = None, 0.0, False
            while not done:
                with th.no_grad():
                    x = th.as_tensor(obs, device=device)[None, None]
                    action, state, masks = policy(x, state)
                if masks is not None:
                    active = active + masks[0, 0].float().cpu().numpy()
                    steps += 1
                obs, reward, terminated, truncated, _ = env.step(action[0, 0].cpu().numpy())
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    activity = [round(float(a), 4) for a in np.atleast_1d(active / steps)] if steps else None
    return PerturbResult(perturb, episodes, float(np.mean(returns)), float(np.std(returns)), returns, seed, activity)


def record_perturb(run_dir: Path, results: list[PerturbResult]) -> Path:
    """Add (or replace) each result's entry, keyed by its perturbation spec, in ``run_dir/perturb.json``."""
    path = run_dir / "perturb.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    for r in results:
        data[r.perturb] = r.to_dict()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path
