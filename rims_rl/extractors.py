"""Feature extractors that turn observations into the RIM's input set.

Every extractor returns SB3's flat ``(batch, features_dim)`` tensor, so it works wherever an SB3 extractor does.
An extractor that produces a *set* of ``N`` elements (rather than one vector) says so with two attributes:
``set_size = N`` and ``element_size = D``, with ``features_dim = N * D``; the flat features are the ``N``
elements one after the other. The RIM policies read these attributes (an extractor without them is one vector,
``N = 1``); an LSTM reads the same flat features.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

__all__ = [
    "NATURE_CNN_MIN_SIDE",
    "GridMissionExtractor",
    "NatureCNNGrid",
    "SmallImageCNN",
    "conv_stack",
    "input_set_shape",
]


def input_set_shape(extractor: nn.Module, features_dim: int) -> tuple[int, int]:
    """``(N, D)``: how the RIM reads an extractor's flat features (one vector unless the extractor is a set)."""
    set_size = int(getattr(extractor, "set_size", 1))
    if set_size < 1 or features_dim % set_size:
        raise ValueError(f"extractor set_size={set_size} does not divide its features_dim={features_dim}")
    return set_size, features_dim // set_size


def _positions(n: int) -> th.Tensor:
    """``n`` coordinates evenly spread over [-1, 1] (0 for a single position)."""
    return th.linspace(-1.0, 1.0, n) if n > 1 else th.zeros(1)


NATURE_CNN_MIN_SIDE = 36
"""The smallest image side the Nature CNN's convolutions (8x8 stride 4, 4x4 stride 2, 3x3) can take."""


def conv_stack(n_channels: int, height: int, width: int) -> nn.Sequential:
    """The convolutions for a channels-first ``n_channels x height x width`` image, ReLU after each.

    Images of side >= :data:`NATURE_CNN_MIN_SIDE`: the Nature-DQN stack (Mnih et al., 2015; SB3's ``NatureCNN``):
    32 8x8 stride 4, 64 4x4 stride 2, 64 3x3. Smaller images (MiniGrid's pixels, toy envs): three 3x3 convolutions
    with padding 1 and 32, 64, 64 channels, the first two with stride 2 when the image's smaller side is >= 12
    (a 16x16 image gives a 64 x 4 x 4 map), else stride 1.
    """
    if min(height, width) >= NATURE_CNN_MIN_SIDE:
        return nn.Sequential(
            nn.Conv2d(n_channels, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
        )
    stride = 2 if min(height, width) >= 12 else 1
    return nn.Sequential(
        nn.Conv2d(n_channels, 32, kernel_size=3, stride=stride, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3, stride=stride, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
    )


def _check_image(observation_space: gym.Space, normalized_image: bool, name: str) -> None:
    if not isinstance(observation_space, gym.spaces.Box) or not is_image_space(
        observation_space, check_channels=False, normalized_image=normalized_image
    ):
        raise ValueError(f"{name} needs a channels-first image observation space, got {observation_space}")


class SmallImageCNN(BaseFeaturesExtractor):
    """:func:`conv_stack`'s small-image convolutions, a linear layer and ReLU: SB3's ``NatureCNN`` for images whose
    side is under :data:`NATURE_CNN_MIN_SIDE` (the Nature stack cannot take them).

    :param observation_space: a channels-first image space.
    :param features_dim: output size.
    :param normalized_image: as in SB3's NatureCNN: True if images are already scaled to [0, 1].
    """

    def __init__(self, observation_space: gym.Space, features_dim: int = 256, normalized_image: bool = False) -> None:
        _check_image(observation_space, normalized_image, "SmallImageCNN")
        super().__init__(observation_space, features_dim)
        self.cnn = nn.Sequential(conv_stack(*observation_space.shape), nn.Flatten())
        with th.no_grad():
            flat = self.cnn(th.as_tensor(observation_space.sample()[None]).float()).shape[1]
        self.linear = nn.Sequential(nn.Linear(flat, features_dim), nn.ReLU())

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.linear(self.cnn(observations))


class NatureCNNGrid(BaseFeaturesExtractor):
    """The Nature-DQN convolutional stack (Mnih et al., 2015), read as a set of spatial positions.

    The three convolutions of :class:`stable_baselines3.common.torch_layers.NatureCNN` (without its final linear
    layer) give a ``64 x h x w`` feature map (``7 x 7`` for 84x84 Atari frames). Each of the ``h * w`` positions is
    one element of the RIM's input set: its 64 channels followed by its coordinates ``(row, col)`` scaled to
    ``[-1, 1]``, so that attention can tell positions apart (a set has no order).

    Images whose side is under :data:`NATURE_CNN_MIN_SIDE` get :func:`conv_stack`'s small-image convolutions.

    :param observation_space: a channels-first image space.
    :param normalized_image: as in SB3's NatureCNN: True if images are already scaled to [0, 1].
    :param coordinates: append the two coordinate features to each position (default True).
    """

    def __init__(self, observation_space: gym.Space, normalized_image: bool = False, coordinates: bool = True) -> None:
        _check_image(observation_space, normalized_image, "NatureCNNGrid")
        cnn = conv_stack(*observation_space.shape)
        with th.no_grad():
            _, channels, height, width = cnn(th.as_tensor(observation_space.sample()[None]).float()).shape
        element_size = channels + (2 if coordinates else 0)
        super().__init__(observation_space, features_dim=height * width * element_size)
        self.cnn = cnn
        self.set_size = height * width
        self.element_size = element_size
        if coordinates:
            rows = _positions(height).view(height, 1).expand(height, width)
            cols = _positions(width).view(1, width).expand(height, width)
            self.register_buffer("coords", th.stack([rows, cols], dim=-1).reshape(1, height * width, 2))
        else:
            self.coords = None

    def forward(self, observations: th.Tensor) -> th.Tensor:
        grid = self.cnn(observations).flatten(2).transpose(1, 2)  # (batch, h*w, channels)
        if self.coords is not None:
            grid = th.cat([grid, self.coords.expand(grid.shape[0], -1, -1)], dim=-1)
        return grid.flatten(1)


class GridMissionExtractor(BaseFeaturesExtractor):
    """Goal-conditioned encoder of a symbolic grid view and a tokenised mission (BabyAI-style dict observations).

    Observations: ``{"image": (H, W, C) integer codes, "mission": (L,) word ids, 0 = padding}`` (the object-picking
    envs of :mod:`rims_rl.envs.babyai` give MiniGrid's ``7 x 7 x 3`` codes and 5-word missions); SB3 hands them over as
    floats, which are read back as integers.

    - *cells*: each of a cell's ``C`` codes has its own embedding table (sized from the space's upper bounds); a
      cell is the sum of its ``C`` embeddings. Two 3x3 convolutions (padding 1, ReLU) follow, the second modulated
      by the mission with FiLM (Perez et al., 2018; BabyAI's models condition on the mission the same way):
      ``relu(conv(x) * (1 + gamma(m)) + beta(m))``.
    - *mission*: word embeddings, a GRU, its state after the last real word: ``m``. With a ``direction`` key (a
      ``Discrete`` space: MiniGrid's agent direction, one-hot encoded by SB3), ``m`` is followed by it.
    - ``input_set="vector"``: the ``H * W`` cells flattened, concatenated with ``m``, and one linear layer to
      ``features_dim`` (the paper's one-layer encoder, App. C.8), layer-normalised, then ReLU; one element. The layer
      norm bounds what the recurrent core reads: without it, RecurrentPPO grew the features ~20x within 100 updates
      on object picking, 97% of the RIM's gate pre-activations went beyond +-3 (saturated), the gradients into the
      core and the encoder vanished, and RIM-PPO stayed at chance; with it both cores learn (README, BabyAI).
    - ``input_set="grid"``: a set of ``H * W`` elements, one per cell: its ``channels`` features (which carry the
      mission through FiLM) and its coordinates ``(row, col)`` in ``[-1, 1]``.

    The RIM and the LSTM read the same features (the LSTM the flat vector of the set).

    :param observation_space: a ``Dict`` space with ``image_key`` (a ``Box`` of non-negative integer codes,
        channels last) and ``mission_key`` (a ``Box`` of word ids).
    :param features_dim: output size with ``input_set="vector"``.
    :param channels: channels of the cell features.
    :param word_dim: word embedding size.
    :param mission_dim: GRU state size (the mission encoding ``m``).
    :param input_set: ``"vector"`` or ``"grid"`` (see above).
    """

    def __init__(
        self,
        observation_space: gym.Space,
        features_dim: int = 128,
        channels: int = 32,
        word_dim: int = 32,
        mission_dim: int = 64,
        input_set: str = "vector",
        image_key: str = "image",
        mission_key: str = "mission",
        direction_key: str = "direction",
    ) -> None:
        if not isinstance(observation_space, gym.spaces.Dict) or not {image_key, mission_key} <= set(
            observation_space.spaces
        ):
            raise ValueError(f"GridMissionExtractor needs a Dict space with '{image_key}' and '{mission_key}' keys")
        extra = set(observation_space.spaces) - {image_key, mission_key, direction_key}
        direction = observation_space.spaces.get(direction_key)
        if extra or (direction is not None and not isinstance(direction, gym.spaces.Discrete)):
            raise ValueError(
                f"GridMissionExtractor reads '{image_key}', '{mission_key}' and a Discrete '{direction_key}', got "
                f"{observation_space}"
            )
        image, mission = observation_space[image_key], observation_space[mission_key]
        if not (isinstance(image, gym.spaces.Box) and len(image.shape) == 3 and isinstance(mission, gym.spaces.Box)):
            raise ValueError("GridMissionExtractor needs an (H, W, C) Box image and a (L,) Box of word ids")
        if input_set not in ("vector", "grid"):
            raise ValueError(f"input_set must be 'vector' or 'grid', got {input_set!r}")
        height, width, n_codes = image.shape
        cells = height * width
        grid = input_set == "grid"
        super().__init__(observation_space, features_dim=cells * (channels + 2) if grid else features_dim)
        self.image_key, self.mission_key, self.input_set = image_key, mission_key, input_set
        self.direction_key = direction_key if direction is not None else None
        goal_dim = mission_dim + (int(direction.n) if direction is not None else 0)  # m, then the direction
        sizes = [int(h) + 1 for h in np.asarray(image.high, dtype=np.int64).reshape(-1, n_codes).max(axis=0)]
        self.register_buffer("code_offsets", th.tensor([0, *np.cumsum(sizes)[:-1]], dtype=th.long))
        self.cell_embedding = nn.Embedding(sum(sizes), channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        vocab = int(np.asarray(mission.high).max()) + 1
        self.word_embedding = nn.Embedding(vocab, word_dim, padding_idx=0)
        self.mission_rnn = nn.GRU(word_dim, mission_dim, batch_first=True)
        self.film = nn.Linear(goal_dim, 2 * channels)
        if grid:
            self.set_size, self.element_size = cells, channels + 2
            rows = _positions(height).view(height, 1).expand(height, width)
            cols = _positions(width).view(1, width).expand(height, width)
            self.register_buffer("coords", th.stack([rows, cols], dim=-1).reshape(1, cells, 2))
            self.head = None
        else:
            linear = nn.Linear(cells * channels + goal_dim, features_dim)
            self.head = nn.Sequential(linear, nn.LayerNorm(features_dim), nn.ReLU())

    def encode_mission(self, words: th.Tensor) -> th.Tensor:
        """``(B, L)`` word ids -> ``(B, mission_dim)``: the GRU's output after the last non-padding word."""
        words = words.long()
        lengths = (words > 0).sum(dim=1)
        words = words[:, : max(int(lengths.max()), 1)]  # padding after the longest mission changes no output
        output, _ = self.mission_rnn(self.word_embedding(words))
        last = lengths.clamp(min=1) - 1
        return output[th.arange(words.shape[0], device=words.device), last]

    def forward(self, observations: dict[str, th.Tensor]) -> th.Tensor:
        codes = observations[self.image_key].long()  # (B, H, W, C)
        x = self.cell_embedding(codes + self.code_offsets).sum(dim=3).permute(0, 3, 1, 2)  # (B, channels, H, W)
        m = self.encode_mission(observations[self.mission_key])
        if self.direction_key is not None:  # SB3 one-hot encodes a Discrete key
            m = th.cat([m, observations[self.direction_key].float().reshape(m.shape[0], -1)], dim=1)
        gamma, beta = self.film(m)[:, :, None, None].chunk(2, dim=1)
        x = th.relu(self.conv1(x))
        x = th.relu(self.conv2(x) * (1 + gamma) + beta)
        if self.head is not None:
            return self.head(th.cat([x.flatten(1), m], dim=1))
        cells = x.flatten(2).transpose(1, 2)  # (B, H*W, channels)
        return th.cat([cells, self.coords.expand(cells.shape[0], -1, -1)], dim=-1).flatten(1)
