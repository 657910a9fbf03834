"""rims-rl: Recurrent Independent Mechanisms (Goyal, Lamb et al., ICLR 2021) for stable-baselines3.

Public API::

    from rims_rl import RIM, RIMInfo                       # the model (pure torch)
    from rims_rl import RIMPolicy, RIMCnnPolicy, RIMMultiInputPolicy   # sb3-contrib policies
    from rims_rl import MlpLstmPolicy, CnnLstmPolicy, MultiInputLstmPolicy  # the LSTM baselines

Algorithms live in :mod:`rims_rl.agents` (``rims_rl.agents.ppo.RecurrentPPO``,
``rims_rl.agents.recurrent_a2c.RecurrentA2C``), environments in :mod:`rims_rl.envs`, feature extractors in
:mod:`rims_rl.extractors`, and the command line in :mod:`rims_rl.cli` (``rims-rl``). Layers (an arrow is "may
import"): ``rims_rl.cli -> rims_rl.agents -> rims_rl.{rim, policies, extractors, config, tracking}, rims_rl.envs``.
"""

from rims_rl.rim import RIM, RIMInfo

__version__ = "0.2.0"

__all__ = [
    "RIM",
    "CnnLstmPolicy",
    "MlpLstmPolicy",
    "MultiInputLstmPolicy",
    "RIMCnnPolicy",
    "RIMInfo",
    "RIMMultiInputPolicy",
    "RIMPolicy",
    "__version__",
]


def __getattr__(name: str):  # the policies pull in SB3: import them on first use, keep `import rims_rl` light
    if name in __all__:
        from rims_rl import policies

        return getattr(policies, name)
    raise AttributeError(f"module 'rims_rl' has no attribute {name!r}")
