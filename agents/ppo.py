"""Recurrent PPO (Schulman et al., 2017) with the project's policies under their short names.

This is sb3-contrib's :class:`~sb3_contrib.RecurrentPPO` unchanged, with ``policy_aliases`` extended so that users
write a string, as in SB3::

    from agents.ppo import RecurrentPPO
    model = RecurrentPPO("RIMPolicy", "CartPoleNoVel-v1", policy_kwargs=dict(num_units=6, unit_size=32))

``MlpLstmPolicy``/``CnnLstmPolicy``/``MultiInputLstmPolicy`` resolve to the project's versions of sb3-contrib's LSTM
policies (same model, sizes kept on save/load, one-call sequences): see :mod:`rims_rl.policies`.
"""

from __future__ import annotations

from typing import ClassVar

from sb3_contrib import RecurrentPPO as _RecurrentPPO
from stable_baselines3.common.policies import BasePolicy

from rims_rl.policies import (
    CnnLstmPolicy,
    MlpLstmPolicy,
    MultiInputLstmPolicy,
    RIMCnnPolicy,
    RIMMultiInputPolicy,
    RIMPolicy,
)

__all__ = ["POLICY_ALIASES", "RecurrentPPO"]

POLICY_ALIASES: dict[str, type[BasePolicy]] = {
    "RIMPolicy": RIMPolicy,
    "RIMCnnPolicy": RIMCnnPolicy,
    "RIMMultiInputPolicy": RIMMultiInputPolicy,
    "MlpLstmPolicy": MlpLstmPolicy,
    "CnnLstmPolicy": CnnLstmPolicy,
    "MultiInputLstmPolicy": MultiInputLstmPolicy,
}


class RecurrentPPO(_RecurrentPPO):
    """sb3-contrib's RecurrentPPO; ``policy`` may name any of :data:`POLICY_ALIASES`. Parameters are
    sb3-contrib's."""

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = POLICY_ALIASES
