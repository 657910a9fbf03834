"""Experiment configuration: one validated tree, from YAML files (rl-zoo style), CLI flags and ``--set`` overrides.

Resolution order (later wins):

1. the defaults below (every field documents itself; ``rims-rl config`` prints them);
2. the env family's file ``configs/<family>.yaml`` (an env outside the families: ``configs/default.yaml``): its
   ``default`` section, then the sections named by the env's kind (:data:`KIND_SECTIONS`: ``vector``, ``image``,
   ``dict`` or ``mission`` by its observations, then ``continuous`` for Box actions), then the env id's section;
3. a user file given with ``--config FILE`` (either a flat partial config, or sections keyed ``default``, kind
   names and env ids, merged in the same order);
4. the dedicated CLI flags (``--total-timesteps``, ``--n-envs``, ``--seed``, ...);
5. ``--set key=value`` overrides with dotted keys (``--set rim.k_active=5 --set ppo.learning_rate=1e-3``).

Every key is checked: an unknown or mistyped key fails with the closest valid key, a wrong type or range with the
valid range. The same names are used in YAML, on the CLI, in the resolved ``config.yaml`` of a run, and in W&B.
"""

from __future__ import annotations

import difflib
import re
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ABLATIONS",
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "KIND_SECTIONS",
    "SHIPPED_EXPERT",
    "A2CConfig",
    "ActivationConfig",
    "AtariConfig",
    "CheckpointConfig",
    "ConfigError",
    "CopyingConfig",
    "DaggerConfig",
    "EvalConfig",
    "ImitationConfig",
    "LSTMConfig",
    "NetworkConfig",
    "PPOConfig",
    "RIMConfig",
    "TrainConfig",
    "TransferConfig",
    "WandbConfig",
    "describe_fields",
    "flat_keys",
    "parse_overrides",
    "resolve_config",
    "resolve_copying_config",
    "resolve_imitation_config",
]

CONFIG_DIR = Path(str(files("rims_rl.configs")))
SHIPPED_EXPERT = Path(str(files("rims_rl.experts"))) / "HalfCheetah-v5.pt"  # the SAC actor shipped as package data
"""The shipped YAML configs (package data: ``configs/`` in the checkout)."""
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
"""The config of envs outside the project's families (chosen by their spaces)."""

KIND_SECTIONS: dict[str, str] = {
    "vector": "flat vector observations (a Box that is not an image): MLP extractor",
    "image": "uint8 image observations (HxWxC or CxHxW): Nature CNN, or a small CNN under 36 pixels",
    "dict": "Dict observations: SB3's multi-input extractor (a CNN per image key, flattened vectors)",
    "mission": "MiniGrid-style dicts with a text mission: the grid + mission extractor (word ids)",
    "continuous": "Box actions (a Gaussian policy)",
}
"""Sections a sectioned config file may hold besides ``default`` and env ids, by the env's spaces (module doc); they
apply to envs outside the families (a family's file says what its envs need)."""


class ConfigError(ValueError):
    """A configuration problem, with a one-line message that says what is wrong and what is valid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_Config = TypeVar("_Config", bound=_Section)


class RIMConfig(_Section):
    """The RIM recurrent core (paper §2; defaults from Table 3)."""

    num_units: int = Field(6, ge=1, description="K, the number of RIMs")
    unit_size: int = Field(100, ge=1, description="H, the hidden size of each RIM")
    k_active: int = Field(4, ge=1, description="k_A, units active per step (1..num_units)")
    cell: Literal["lstm", "gru"] = Field("lstm", description="dynamics of each unit")
    input_key_size: int = Field(64, ge=1, description="query/key size per input-attention head")
    input_value_size: int | None = Field(None, ge=1, description="what a unit reads, all heads (default 4*unit_size)")
    input_heads: int = Field(4, ge=1, description="input-attention heads")
    comm_key_size: int = Field(32, ge=1, description="query/key size per communication head")
    comm_value_size: int = Field(32, ge=1, description="value size per communication head")
    comm_heads: int = Field(4, ge=1, description="communication heads")
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="attention dropout (Table 3; PPO's update runs in train mode: see README)"
    )
    input_attention: bool = Field(True, description="False: ablation without input attention (all units active)")
    communication: bool = Field(True, description="False: ablation without communication between units")
    input_set: Literal["vector", "grid"] = Field(
        "vector",
        description="images and grid views: the RIM reads the encoder's output vector or its grid of positions/cells",
    )

    @model_validator(mode="after")
    def _check(self) -> RIMConfig:
        if self.k_active > self.num_units:
            raise ValueError(f"rim.k_active={self.k_active} must be in [1, rim.num_units={self.num_units}]")
        value_size = self.input_value_size or 4 * self.unit_size
        if value_size % self.input_heads:
            raise ValueError(f"rim.input_heads={self.input_heads} must divide the input value size {value_size}")
        return self

    def rim_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~rims_rl.rim.RIM` beyond the four the policies take directly."""
        keys = ("input_key_size", "input_value_size", "input_heads", "comm_key_size", "comm_value_size",
                "comm_heads", "dropout", "input_attention", "communication")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


def apply_ablations(rim: RIMConfig, ablations: list[str]) -> None:
    """Set the ``rim.*`` keys each preset of :data:`ABLATIONS` stands for (idempotent: a resolved config validates
    to itself)."""
    for name in ablations:
        if name == "no_input_attention":
            rim.input_attention = False
        elif name == "no_communication":
            rim.communication = False
        elif name == "all_active":
            rim.k_active = rim.num_units
        elif name == "one_head":
            rim.input_heads = rim.comm_heads = 1


class LSTMConfig(_Section):
    """The LSTM baseline's recurrent core (sb3-contrib's)."""

    hidden_size: int = Field(256, ge=1, description="LSTM hidden size")


class NetworkConfig(_Section):
    """Heads and feature extractor, shared by the RIM and LSTM policies."""

    net_arch: list[int] | dict[str, list[int]] | None = Field(
        None, description="SB3 net_arch of the heads after the recurrent core (list, or dict with pi/vf)"
    )
    activation_fn: Literal["tanh", "relu", "elu", "gelu"] = Field("tanh", description="activation of the heads")
    ortho_init: bool = Field(True, description="orthogonal initialisation of extractor and heads (SB3)")
    recurrent_critic: Literal["separate", "shared", "shared_detached", "none"] = Field(
        "separate",
        description="critic's recurrence: own core (sb3-contrib default); the actor's core trained by both losses "
        "(paper's PPO); the actor's core detached (sb3-contrib shared_lstm); none",
    )
    share_features_extractor: bool = Field(True, description="one feature extractor for actor and critic")
    log_std_init: float = Field(0.0, description="initial log std of Gaussian actions")


class PPOConfig(_Section):
    """RecurrentPPO settings (sb3-contrib names)."""

    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate")
    lr_schedule: Literal["constant", "linear"] = Field("constant", description="linear: decay to 0 over training")
    n_steps: int = Field(128, ge=1, description="steps per env per rollout")
    batch_size: int = Field(128, ge=1, description="minibatch size (samples)")
    n_epochs: int = Field(10, ge=1, description="epochs over each rollout")
    gamma: float = Field(0.99, ge=0.0, le=1.0, description="discount")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, description="PPO clip range")
    clip_range_schedule: Literal["constant", "linear"] = Field("constant", description="linear: decay to 0")
    ent_coef: float = Field(0.0, ge=0.0, description="entropy coefficient")
    vf_coef: float = Field(0.5, ge=0.0, description="value loss coefficient")
    max_grad_norm: float = Field(0.5, gt=0, description="gradient clipping norm")
    normalize_advantage: bool = Field(True, description="normalise advantages per minibatch")
    target_kl: float | None = Field(None, gt=0, description="early-stop epochs above this KL")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    use_sde: bool = Field(False, description="generalised state-dependent exploration (continuous actions)")
    sde_sample_freq: int = Field(-1, description="resample gSDE noise every N steps (-1: per rollout)")


class A2CConfig(_Section):
    """RecurrentA2C settings (SB3's A2C names; ``agents/recurrent_a2c.py``): one gradient step per rollout."""

    learning_rate: float = Field(7e-4, gt=0, description="learning rate (RMSprop 7e-4: paper App. C.8)")
    lr_schedule: Literal["constant", "linear"] = Field("constant", description="linear: decay to 0 over training")
    n_steps: int = Field(5, ge=1, description="steps per env per rollout (= per update; BPTT length)")
    gamma: float = Field(0.99, ge=0.0, le=1.0, description="discount")
    gae_lambda: float = Field(1.0, ge=0.0, le=1.0, description="GAE lambda (1: n-step returns, SB3's A2C)")
    ent_coef: float = Field(0.0, ge=0.0, description="entropy coefficient")
    vf_coef: float = Field(0.5, ge=0.0, description="value loss coefficient")
    max_grad_norm: float = Field(0.5, gt=0, description="gradient clipping norm")
    normalize_advantage: bool = Field(False, description="normalise the advantages of each rollout")
    use_rms_prop: bool = Field(True, description="RMSprop (alpha 0.99); false: Adam")
    rms_prop_eps: float = Field(1e-5, gt=0, description="RMSprop epsilon")
    use_sde: bool = Field(False, description="generalised state-dependent exploration (continuous actions)")
    sde_sample_freq: int = Field(-1, description="resample gSDE noise every N steps (-1: per rollout)")


class EvalConfig(_Section):
    """Evaluation during and after training (on env seeds disjoint from training)."""

    episodes: int = Field(20, ge=1, description="episodes per evaluation")
    deterministic: bool = Field(True, description="greedy actions in evaluation")
    freq: int = Field(0, ge=0, description="evaluate every N env steps during training (0: only at the end)")
    stop_at: float | None = Field(None, description="stop training once the evaluation mean return reaches this")


class AtariConfig(_Section):
    """Preprocessing of Atari games (``envs/atari.py``); evaluation always plays whole games with raw scores."""

    terminal_on_life_loss: bool = Field(True, description="learning episodes end at each life lost (DeepMind)")
    clip_reward: bool = Field(True, description="learn from the sign of each reward (DeepMind)")
    noop_max: int = Field(30, ge=0, description="at most this many no-op actions after a reset")
    frame_skip: int = Field(4, ge=1, description="emulator frames per agent step, max-pooled over the last two")
    frame_stack: int = Field(4, ge=1, description="frames stacked in an observation")
    screen_size: int = Field(84, ge=36, description="observations are screen_size x screen_size greyscale")


class CheckpointConfig(_Section):
    """When a run writes checkpoints (always at the end and on SIGINT/SIGTERM; see ``agents/checkpoints.py``)."""

    every_steps: int = Field(0, ge=0, description="checkpoint every N env steps (0: off)")
    every_minutes: float = Field(10.0, ge=0.0, description="checkpoint every N minutes of wall time (0: off)")
    keep: int = Field(2, ge=1, description="keep the newest N checkpoints")


class ActivationConfig(_Section):
    """What is recorded of the RIM's per-step activations during training (RIM policies; no extra forward pass)."""

    record: bool = Field(
        True, description="per rollout: unit activation rates, null attention, winner-set change rate (rim/...)"
    )
    heatmap_every: int = Field(1, ge=0, description="a time x unit heatmap image to W&B every N rollouts (0: never)")
    heatmap_env: int = Field(0, ge=0, description="the training env (index) whose steps the heatmap shows")
    save_every: int = Field(
        0, ge=0, description="save every step's masks to activations/*.npz every N rollouts (0: never)"
    )


class TransferConfig(_Section):
    """Start from a trained run's weights (``rims-rl transfer``; Rusu et al. 2016's fine-tuning baselines)."""

    source: str | None = Field(None, description="run directory (or model .zip) whose weights the model starts from")
    mode: Literal["finetune-all", "finetune-head", "frozen-features"] = Field(
        "finetune-all",
        description="what trains: everything / only the fresh output layers / all but the CNN (see agents/transfer.py)",
    )


class WandbConfig(_Section):
    """Weights & Biases logging (offline by default: a local run directory, no account)."""

    mode: Literal["offline", "online", "disabled"] = Field("offline", description="W&B mode")
    project: str = Field("rims-rl", description="W&B project")
    entity: str | None = Field(None, description="W&B entity (user or team)")
    group: str | None = Field(None, description="W&B run group (default: the env id)")
    tags: list[str] = Field(default_factory=list, description="extra W&B tags")


ABLATIONS: dict[str, str] = {
    "no_input_attention": "rim.input_attention=false: every unit reads the input, all units active",
    "no_communication": "rim.communication=false: units do not read each other",
    "all_active": "rim.k_active=rim.num_units: no competition, every unit updates at every step",
    "one_head": "rim.input_heads=1 and rim.comm_heads=1: single-head input and communication attention",
}
"""The paper's ablations (§4.4, App. C.11, C.13) as presets: ``ablations: [...]`` or ``--ablation NAME``."""

Ablation = Literal["no_input_attention", "no_communication", "all_active", "one_head"]


class TrainConfig(_Section):
    """Everything one training run needs; the resolved tree is saved as ``config.yaml`` in the run directory."""

    env: str = Field("CartPoleNoVel-v1", description="gymnasium env id (or module:EnvId)")
    gym_packages: list[str] = Field(
        default_factory=list, description="packages imported before the env is made (registering its id)"
    )
    policy: Literal["rims", "lstm"] = Field("rims", description="recurrent core")
    algo: Literal["ppo", "a2c"] = Field("ppo", description="learning algorithm: RecurrentPPO or RecurrentA2C")
    total_timesteps: int = Field(100_000, ge=1, description="env steps to train for")
    n_envs: int = Field(8, ge=1, description="parallel environments")
    vec_env: Literal["auto", "ale", "dummy", "subproc"] = Field(
        "auto",
        description="auto: ale for Atari, else dummy; ale: ale-py's native vector env; dummy/subproc: SB3's VecEnvs",
    )
    ablations: list[Ablation] = Field(
        default_factory=list, description="RIM ablation presets applied to rim.* (" + ", ".join(ABLATIONS) + ")"
    )
    efference_copy: bool = Field(
        False, description="join the previous action and reward to the observation (paper App. C.3), both cores"
    )
    normalize_reward: bool = Field(
        False, description="scale training rewards by a running return std (SB3 VecNormalize; scores stay raw)"
    )
    normalize_obs: bool = Field(
        False,
        description="normalise vector observations by a running mean and std (SB3 VecNormalize, rl-zoo's normalize); "
        "saved with the model (vecnormalize.pkl) and applied wherever it is evaluated",
    )
    seed: int = Field(0, ge=0, description="random seed (envs, torch, numpy)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    rim: RIMConfig = Field(default_factory=RIMConfig)
    lstm: LSTMConfig = Field(default_factory=LSTMConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    a2c: A2CConfig = Field(default_factory=A2CConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    atari: AtariConfig = Field(default_factory=AtariConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    activations: ActivationConfig = Field(default_factory=ActivationConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="after")
    def _apply_ablations(self) -> TrainConfig:
        if self.ablations and self.policy != "rims":
            raise ValueError(f"ablations {self.ablations} apply to the RIM policy, not policy={self.policy!r}")
        apply_ablations(self.rim, self.ablations)
        return self

    @property
    def algo_settings(self) -> PPOConfig | A2CConfig:
        """The section of the configured algorithm (``ppo`` or ``a2c``)."""
        return self.a2c if self.algo == "a2c" else self.ppo

    @model_validator(mode="after")
    def _check_heatmap_env(self) -> TrainConfig:
        if self.activations.heatmap_env >= self.n_envs:
            raise ValueError(
                f"activations.heatmap_env={self.activations.heatmap_env} is not one of the {self.n_envs} training "
                f"envs (valid: 0..{self.n_envs - 1})"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        """Configs of runs made before 0.2 name ``checkpoint.every_steps`` ``checkpoint_freq``."""
        if isinstance(data, dict) and "checkpoint_freq" in data:
            data = dict(data)
            old = data.pop("checkpoint_freq")
            data["checkpoint"] = {"every_steps": old, **(data.get("checkpoint") or {})}
        return data


class DaggerConfig(_Section):
    """DAgger rounds after behaviour cloning (Ross et al., 2011; not in the paper): the clone drives, the expert labels.

    Each round plays ``episodes`` episodes of the pixel env in which each step's action is the expert's with
    probability ``beta ** round`` and the clone's otherwise, labels every step with the expert's action on the true
    state, adds the episodes to the training set and trains ``epochs`` more epochs on all of it."""

    rounds: int = Field(
        0, ge=0, description="DAgger rounds after the `epochs` of behaviour cloning (0: BC only, the paper's)"
    )
    episodes: int = Field(4, ge=1, description="episodes played (side by side) and labelled per round")
    epochs: int = Field(2, ge=1, description="epochs over the grown training set after each round")
    beta: float = Field(0.5, ge=0, le=1, description="round r executes the expert's action with probability beta**r")
    expert: str = Field("", description="expert .pt or run directory labelling the steps (empty: SHIPPED_EXPERT)")
    max_steps: int | None = Field(None, ge=1, description="cut the played episodes at N steps (None: 1000)")


class ImitationConfig(_Section):
    """Behaviour cloning from pixels (``rims-rl imitate``; paper App. C.7): conv encoder -> recurrent core -> head."""

    demos: str = Field("", description="demonstrations file from `rims-rl demos` (.npz)")
    policy: Literal["rims", "lstm", "gru"] = Field("rims", description="recurrent core")
    hidden_size: int = Field(600, ge=1, description="hidden units of the GRU/LSTM core (paper: GRU 600)")
    head_size: int = Field(256, ge=1, description="width of the action head's two ReLU layers (paper: 256)")
    frame_stack: int = Field(4, ge=1, description="past frames stacked into one observation (paper: 4)")
    seq_len: int = Field(50, ge=1, description="truncated BPTT: steps per gradient update (state carried across)")
    batch_size: int = Field(8, ge=1, description="episodes trained side by side (one window each per update)")
    epochs: int = Field(10, ge=1, description="passes over the training episodes")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clipping")
    val_episodes: int = Field(2, ge=0, description="demo episodes held out for the validation loss")
    eval_episodes: int = Field(
        3, ge=0, description="env episodes played after training, without and with perturbation (0: none)"
    )
    eval_max_steps: int | None = Field(None, ge=1, description="cut evaluation episodes at N steps (None: 1000)")
    augment: Literal["none", "shift"] = Field(
        "none", description="training-frame augmentation: `shift` moves each window's frames by up to `shift_pad` px"
    )
    shift_pad: int = Field(4, ge=1, description="`augment: shift`: pad by this many pixels, crop at a random offset")
    seed: int = Field(0, ge=0, description="random seed (torch, numpy, evaluation envs)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    rim: RIMConfig = Field(default_factory=lambda: RIMConfig(k_active=3))
    dagger: DaggerConfig = Field(default_factory=DaggerConfig)

    @property
    def total_epochs(self) -> int:
        """``epochs`` of behaviour cloning, then ``dagger.epochs`` after each of the ``dagger.rounds``."""
        return self.epochs + self.dagger.rounds * self.dagger.epochs

    def dagger_round_due(self, epoch: int) -> int:
        """How many DAgger rounds must have been played before training epoch ``epoch + 1``."""
        if not self.dagger.rounds or epoch < self.epochs:
            return 0
        return min(self.dagger.rounds, (epoch - self.epochs) // self.dagger.epochs + 1)

    wandb: WandbConfig = Field(default_factory=WandbConfig)


class CopyingConfig(_Section):
    """The copying task (``rims-rl copying``; paper §4.1.1 and App. C.5; ``agents/copying.py``)."""

    model: Literal["rims", "lstm", "gru"] = Field("rims", description="recurrent core")
    hidden_size: int = Field(600, ge=1, description="units of the LSTM/GRU core (paper: 600, as the RIM's 6 x 100)")
    ablations: list[Ablation] = Field(
        default_factory=list, description="RIM ablation presets applied to rim.* (" + ", ".join(ABLATIONS) + ")"
    )
    train_span: int = Field(50, ge=1, description="blank span T of training sequences (T + 2 x digits steps; paper 50)")
    test_span: int = Field(200, ge=1, description="blank span of the test sequences (paper: 200)")
    digits: int = Field(10, ge=1, description="digits to copy per sequence (paper: 10)")
    blank_input: Literal["token", "zeros"] = Field(
        "token", description="a blank is token 0's one-hot vector, or a zero vector (its key ties with the null's)"
    )
    batch_size: int = Field(64, ge=1, description="sequences per update (paper: 64)")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate (App. C.5: 1e-3)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clipping (the authors' code: 1.0)")
    updates: int = Field(30_000, ge=1, description="updates to train for (the authors': 150 epochs x 200 = 30,000)")
    eval_every: int = Field(200, ge=1, description="updates between evaluations and checkpoints")
    eval_sequences: int = Field(640, ge=1, description="test sequences per span and evaluation (fixed seed)")
    seed: int = Field(0, ge=0, description="random seed (weights, training sequences)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    rim: RIMConfig = Field(default_factory=RIMConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="after")
    def _apply_ablations(self) -> CopyingConfig:
        if self.ablations and self.model != "rims":
            raise ValueError(f"ablations {self.ablations} apply to the RIM model, not model={self.model!r}")
        apply_ablations(self.rim, self.ablations)
        return self


def resolve_copying_config(
    user_file: Path | None = None, flags: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> CopyingConfig:
    """The defaults, then ``--config FILE``, the CLI flags and ``--set`` items, validated."""
    return _resolve_layers(CopyingConfig, [], user_file, flags, overrides)


def resolve_imitation_config(
    user_file: Path | None = None, flags: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> ImitationConfig:
    """``configs/cheetah.yaml``, then ``--config FILE``, the CLI flags and ``--set`` items, validated."""
    base = [(load_yaml(CONFIG_DIR / "cheetah.yaml"), str(CONFIG_DIR / "cheetah.yaml"))]
    return _resolve_layers(ImitationConfig, base, user_file, flags, overrides)


def _resolve_layers(
    model: type[_Config],
    base: list[tuple[dict[str, Any], str]],
    user_file: Path | None,
    flags: dict[str, Any] | None,
    overrides: list[str] | None,
) -> _Config:
    """``base`` layers, then ``user_file``, ``flags`` and ``overrides``, each merged and validated in turn (an error
    names the layer it came from)."""
    data: dict[str, Any] = {}
    layers = list(base)
    if user_file is not None:
        layers.append((load_yaml(user_file), str(user_file)))
    if flags:
        layers.append((_nest(flags), "command-line flags"))
    if overrides:
        layers.append((parse_overrides(overrides), "--set"))
    for layer, source in layers:
        data = _deep_merge(data, layer)
        try:
            model.model_validate(data)
        except ValidationError as err:
            raise _format_error(err, source, model) from None
    return model.model_validate(data)


# ----------------------------------------------------------------------------------------------------------------
def describe_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, default, description)`` for every leaf of the config tree."""
    rows = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            rows += describe_fields(sub, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((prefix + name, default, field.description or ""))
    return rows


def flat_keys(model: type[BaseModel] = TrainConfig) -> list[str]:
    """All dotted keys of the config tree (``ppo.learning_rate``, ...)."""
    return [key for key, _, _ in describe_fields(model)]


def _closest(key: str, model: type[BaseModel] = TrainConfig) -> str:
    keys = flat_keys(model)
    matches = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not matches:  # a bare leaf name given without its section (``k_active`` for ``rim.k_active``)
        matches = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _format_error(err: ValidationError, source: str, model: type[BaseModel] = TrainConfig) -> ConfigError:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return ConfigError(f"unknown config key '{key}' in {source}{_closest(key, model)}")
    if first["type"] == "value_error":  # our cross-field checks carry their own sentence
        return ConfigError(f"{first['msg'].removeprefix('Value error, ')} (in {source})")
    value = first.get("input")
    where = f"config key '{key}'" if key else "config"
    return ConfigError(f"{where} = {value!r} in {source}: {first['msg'].lower()}")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "net_arch":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _validate(data: dict[str, Any], source: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise _format_error(err, source) from None


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; ConfigError if it is missing, unreadable or not a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


_ENV_SECTION = re.compile(r"^[\w.:/-]+-v\d+$")  # gymnasium ids end in -v<N>


def _sections_for(data: dict[str, Any], env_id: str, path: Path, kinds: tuple[str, ...] = ()) -> dict[str, Any]:
    """The partial config a file gives for ``env_id``: ``default``, the ``kinds`` sections, then the env's section
    (rl-zoo style), or the whole file when it is a flat config (whose keys are all validated later)."""

    def is_section(key: Any) -> bool:
        return key == "default" or key in KIND_SECTIONS or bool(_ENV_SECTION.match(str(key)))

    if not any(is_section(key) for key in data):
        return data
    for key in data:
        if not is_section(key):
            raise ConfigError(
                f"unknown top-level key '{key}' in {path}: a config file holds either config keys, or sections "
                f"named 'default', {', '.join(KIND_SECTIONS)} and env ids"
            )
    merged: dict[str, Any] = {}
    for section in ("default", *kinds, env_id):
        part = data.get(section) or {}
        if not isinstance(part, dict):
            raise ConfigError(f"section '{section}' of {path} must be a mapping")
        merged = _deep_merge(merged, part)
    return merged


def _coerce_scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set value '{text}' is not a valid YAML value") from None
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["ppo.n_epochs=4", "rim.k_active=5"]`` -> nested dict; ConfigError on a malformed item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. rim.k_active=5), got '{item}'")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node[parts[-1]] = _coerce_scalar(text)
    return out


def _nest(flags: dict[str, Any]) -> dict[str, Any]:
    """``{"wandb.mode": "disabled"}`` -> ``{"wandb": {"mode": "disabled"}}``."""
    nested: dict[str, Any] = {}
    for key, value in flags.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def resolve_config(
    env_id: str,
    family_file: Path | None,
    user_file: Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    kinds: tuple[str, ...] = (),
) -> TrainConfig:
    """Merge the layers described in the module docstring and validate the result.

    :param env_id: the env id (selects the section of each file).
    :param family_file: the env family's YAML file (:data:`DEFAULT_CONFIG` for other envs), or None.
    :param kinds: the env's :data:`KIND_SECTIONS`, in order (``rims_rl.envs.space_kinds``).
    :param user_file: ``--config FILE``, or None.
    :param flags: values of the dedicated CLI flags that were given (dotted keys allowed), e.g.
        ``{"policy": "lstm", "wandb.mode": "disabled"}``.
    :param overrides: ``--set`` items.
    :raises ConfigError: with a one-line message.
    """
    data: dict[str, Any] = {"env": env_id}
    layers: list[tuple[dict[str, Any], str]] = []
    if family_file is not None:
        layers.append((_sections_for(load_yaml(family_file), env_id, family_file, kinds), str(family_file)))
    if user_file is not None:
        layers.append((_sections_for(load_yaml(user_file), env_id, user_file, kinds), str(user_file)))
    if flags:
        layers.append((_nest(flags), "command-line flags"))
    if overrides:
        layers.append((parse_overrides(overrides), "--set"))
    for layer, source in layers:
        if layer.get("env", env_id) != env_id:
            raise ConfigError(f"{source} sets env={layer['env']!r}: the env is chosen with --env")
        data = _deep_merge(data, layer)
        _validate(data, source)  # fail on the layer that introduced the problem
    return _validate(data, "the configuration")
