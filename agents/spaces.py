"""What an env's spaces choose: the config sections of ``configs/default.yaml`` and the policy's extractor.

An env outside the project's families trains with ``configs/default.yaml``: its ``default`` section, then the
section of its observation kind, then ``continuous`` for Box actions (:data:`rims_rl.config.KIND_SECTIONS`). The
same kind picks the extractor (:func:`extractor_choice`); ``rims-rl config --env ID`` prints both with
:func:`describe_choice`. Spaces are read from the vectorised env (after :func:`rims_rl.envs.make_env`'s wrappers).
"""

from __future__ import annotations

from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first

from rims_rl.extractors import NATURE_CNN_MIN_SIDE

__all__ = ["describe_choice", "extractor_choice", "grid_mission", "image_side", "observation_kind", "space_kinds"]


def grid_mission(space: spaces.Space) -> bool:
    """A dict of a symbolic grid view and a mission of word ids (and MiniGrid's direction), read by
    :class:`rims_rl.extractors.GridMissionExtractor`: the object-picking envs and MiniGrid via ``MissionTokens``."""
    if not isinstance(space, spaces.Dict):
        return False
    keys = set(space.spaces)
    return {"image", "mission"} <= keys <= {"image", "mission", "direction"} and isinstance(
        space["mission"], spaces.Box
    )


def image_side(space: spaces.Space) -> int | None:
    """The smaller side of an image space (channels first or last), or None if ``space`` is not an image."""
    if not is_image_space(space, check_channels=False):
        return None
    shape = space.shape[1:] if is_image_space_channels_first(space) else space.shape[:2]
    return int(min(shape))


def observation_kind(space: spaces.Space) -> str:
    """``mission``, ``dict``, ``image`` or ``vector``: the observation's :data:`~rims_rl.config.KIND_SECTIONS`."""
    if grid_mission(space):
        return "mission"
    if isinstance(space, spaces.Dict):
        return "dict"
    return "image" if image_side(space) is not None else "vector"


def space_kinds(observation_space: spaces.Space, action_space: spaces.Space) -> tuple[str, ...]:
    """The :data:`~rims_rl.config.KIND_SECTIONS` of an env: its observation kind, then ``continuous`` for Box
    actions."""
    kind = observation_kind(observation_space)
    return (kind, "continuous") if isinstance(action_space, spaces.Box) else (kind,)


def extractor_choice(observation_space: spaces.Space, input_set: str = "vector") -> str:
    """The name of the features extractor both cores read ``observation_space`` with (see
    ``rims_rl.agents.training.policy_kwargs``)."""
    kind = observation_kind(observation_space)
    if kind == "mission":
        return "GridMissionExtractor"
    if kind == "dict":
        return "CombinedExtractor"
    if kind == "image":
        small = (image_side(observation_space) or 0) < NATURE_CNN_MIN_SIDE
        if input_set == "grid":
            return "NatureCNNGrid" + (" (small-image convolutions)" if small else "")
        return "SmallImageCNN" if small else "NatureCNN"
    return "FlattenExtractor"


def _describe_space(space: spaces.Space) -> str:
    if isinstance(space, spaces.Dict):
        return "Dict(" + ", ".join(f"{k}: {_describe_space(v)}" for k, v in space.spaces.items()) + ")"
    if isinstance(space, spaces.Box):
        return f"Box{tuple(space.shape)} {space.dtype}"
    return repr(space)


def describe_choice(env_id: str, config_file: str, observation_space: spaces.Space, action_space: spaces.Space) -> str:
    """Comment lines for ``rims-rl config --env ID``: the spaces, the kind and extractor chosen, the config sections."""
    from rims_rl.config import KIND_SECTIONS

    kinds = space_kinds(observation_space, action_space)
    extractor = extractor_choice(observation_space)
    grid = extractor_choice(observation_space, "grid")
    if grid != extractor:
        extractor += f" (rim.input_set=grid: {grid})"
    return "\n".join(
        [
            f"# {env_id}: observations {_describe_space(observation_space)}, actions {_describe_space(action_space)}",
            *(f"# {kind}: {KIND_SECTIONS[kind]}" for kind in kinds),
            f"# extractor: {extractor}",
            f"# config: {config_file}: sections {', '.join(['default', *kinds, env_id])} (where present), "
            "then --config, the flags and --set",
        ]
    )
