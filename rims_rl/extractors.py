"""Feature extractors that turn observations into the RIM's input set.

Every extractor returns SB3's flat ``(batch, features_dim)`` tensor, so it works wherever an SB3 extractor does.
An extractor that produces a *set* of ``N`` elements (rather than one vector) says so with two attributes:
``set_size = N`` and ``element_size = D``, with ``features_dim = N * D``; the flat features are the ``N``
elements one after the other. The RIM policies read these attributes (an extractor without them is one vector,
``N = 1``); an LSTM reads the same flat features.
"""

from __future__ import annotations

import gymnasium as gym
import torch as th
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

__all__ = ["NatureCNNGrid", "input_set_shape"]


def input_set_shape(extractor: nn.Module, features_dim: int) -> tuple[int, int]:
    """``(N, D)``: how the RIM reads an extractor's flat features (one vector unless the extractor is a set)."""
    set_size = int(getattr(extractor, "set_size", 1))
    if set_size < 1 or features_dim % set_size:
        raise ValueError(f"extractor set_size={set_size} does not divide its features_dim={features_dim}")
    return set_size, features_dim // set_size


def _positions(n: int) -> th.Tensor:
    """``n`` coordinates evenly spread over [-1, 1] (0 for a single position)."""
    return th.linspace(-1.0, 1.0, n) if n > 1 else th.zeros(1)


class NatureCNNGrid(BaseFeaturesExtractor):
    """The Nature-DQN convolutional stack (Mnih et al., 2015), read as a set of spatial positions.

    The three convolutions of :class:`stable_baselines3.common.torch_layers.NatureCNN` (without its final linear
    layer) give a ``64 x h x w`` feature map (``7 x 7`` for 84x84 Atari frames). Each of the ``h * w`` positions is
    one element of the RIM's input set: its 64 channels followed by its coordinates ``(row, col)`` scaled to
    ``[-1, 1]``, so that attention can tell positions apart (a set has no order).

    :param observation_space: a channels-first image space.
    :param normalized_image: as in SB3's NatureCNN: True if images are already scaled to [0, 1].
    :param coordinates: append the two coordinate features to each position (default True).
    """

    def __init__(self, observation_space: gym.Space, normalized_image: bool = False, coordinates: bool = True) -> None:
        if not isinstance(observation_space, gym.spaces.Box) or not is_image_space(
            observation_space, check_channels=False, normalized_image=normalized_image
        ):
            raise ValueError(f"NatureCNNGrid needs a channels-first image observation space, got {observation_space}")
        n_channels = observation_space.shape[0]
        cnn = nn.Sequential(
            nn.Conv2d(n_channels, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
        )
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
