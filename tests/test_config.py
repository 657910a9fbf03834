"""Configuration: resolution order, validation, and the family files."""

from __future__ import annotations

import pytest
import yaml

from rims_rl.config import (
    CONFIG_DIR,
    ConfigError,
    TrainConfig,
    describe_fields,
    flat_keys,
    parse_overrides,
    resolve_config,
    resolve_imitation_config,
)
from rims_rl.envs import FAMILIES

CLASSIC = CONFIG_DIR / "classic.yaml"


def test_layers_apply_in_order_defaults_family_user_file_flags_set(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"CartPoleNoVel-v1": {"ppo": {"n_epochs": 7}, "seed": 3}, "default": {"seed": 2}}))
    cfg = resolve_config("CartPoleNoVel-v1", CLASSIC)
    assert cfg.ppo.gamma == yaml.safe_load(CLASSIC.read_text())["CartPoleNoVel-v1"]["ppo"]["gamma"]  # family section
    assert cfg.rim.input_heads == 4  # family default section
    assert cfg.ppo.vf_coef == TrainConfig().ppo.vf_coef  # code default
    cfg = resolve_config("CartPoleNoVel-v1", CLASSIC, user)
    assert (cfg.ppo.n_epochs, cfg.seed) == (7, 3)  # env section beats the file's default section
    cfg = resolve_config("CartPoleNoVel-v1", CLASSIC, user, {"seed": 5}, ["seed=6", "ppo.n_epochs=2"])
    assert (cfg.seed, cfg.ppo.n_epochs) == (6, 2)


def test_flat_user_files_are_accepted(tmp_path):
    user = tmp_path / "flat.yaml"
    user.write_text("rim:\n  k_active: 5\npolicy: lstm\n")
    cfg = resolve_config("CartPoleNoVel-v1", CLASSIC, user)
    assert cfg.rim.k_active == 5 and cfg.policy == "lstm"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rim.k_actve=3"], "unknown config key 'rim.k_actve' in --set (did you mean 'rim.k_active'?)"),
        (["k_active=3"], "unknown config key 'k_active' in --set (did you mean 'rim.k_active'?)"),
        (["rim.k_active=9"], "rim.k_active=9 must be in [1, rim.num_units=6]"),
        (["rim.num_units=-1"], "config key 'rim.num_units' = -1 in --set: input should be greater than or equal to 1"),
        (["rim.cell=rnn"], "config key 'rim.cell' = 'rnn' in --set: input should be 'lstm' or 'gru'"),
        (["ppo.learning_rate=fast"], "config key 'ppo.learning_rate' = 'fast' in --set"),
        (["device=tpu"], "config key 'device' = 'tpu' in --set"),
        (["rim.input_heads=3"], "rim.input_heads=3 must divide the input value size 128"),
        (["novalue"], "--set expects key=value"),
    ],
)
def test_bad_values_fail_with_one_line_naming_key_and_valid_range(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_config("CartPoleNoVel-v1", CLASSIC, overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_keys_in_files_are_reported_with_the_file(tmp_path):
    user = tmp_path / "bad.yaml"
    user.write_text("ppo:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'ppo.lerning_rate' in .*bad.yaml \(did you mean"):
        resolve_config("CartPoleNoVel-v1", CLASSIC, user)
    user.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        resolve_config("CartPoleNoVel-v1", CLASSIC, user)
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve_config("CartPoleNoVel-v1", CLASSIC, tmp_path / "missing.yaml")


def test_override_values_are_typed_like_yaml_with_scientific_floats():
    assert parse_overrides(["ppo.learning_rate=1e-3", "n_envs=4", "rim.communication=false", "wandb.tags=[a, b]"]) == {
        "ppo": {"learning_rate": 1e-3},
        "n_envs": 4,
        "rim": {"communication": False},
        "wandb": {"tags": ["a", "b"]},
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_file_resolves_for_each_of_its_envs_and_policies(family):
    path = CONFIG_DIR / FAMILIES[family].config_name
    if FAMILIES[family].command == "imitate":  # configs/cheetah.yaml configures `rims-rl imitate`
        for policy in ("rims", "gru", "lstm"):
            assert resolve_imitation_config(flags={"policy": policy}).policy == policy
        return
    for env_id in FAMILIES[family].ids:
        for policy in ("rims", "lstm"):
            cfg = resolve_config(env_id, path, flags={"policy": policy})
            assert cfg.env == env_id and cfg.policy == policy


def test_every_key_is_documented():
    rows = describe_fields()
    assert [key for key, _, _ in rows] == flat_keys()
    assert all(help_text for _, _, help_text in rows)


@pytest.mark.parametrize(
    "ablation, expected",
    [("no_input_attention", {"input_attention": False}), ("no_communication", {"communication": False}),
     ("all_active", {"k_active": 6}), ("one_head", {"input_heads": 1, "comm_heads": 1})],
)  # fmt: skip
def test_ablation_presets_set_the_rim_and_survive_a_round_trip(ablation, expected):
    cfg = resolve_config("CartPoleNoVel-v1", CLASSIC, flags={"ablations": [ablation]})
    assert {key: getattr(cfg.rim, key) for key in expected} == expected
    again = TrainConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump())))
    assert again == cfg  # a run's config.yaml resolves to itself (resume compares them)


def test_ablations_are_for_the_rim_policy_only():
    with pytest.raises(ConfigError, match=r"ablations \['one_head'\] apply to the RIM policy"):
        resolve_config("CartPoleNoVel-v1", CLASSIC, flags={"policy": "lstm", "ablations": ["one_head"]})
    with pytest.raises(ConfigError, match="ablations"):
        resolve_config("CartPoleNoVel-v1", CLASSIC, overrides=["ablations=[no_memory]"])


TRAIN_SWEEPS = [p for p in sorted((CONFIG_DIR / "sweeps").glob("*.yaml")) if p.name != "transfer.yaml"]


@pytest.mark.parametrize("sweep_file", TRAIN_SWEEPS, ids=lambda p: p.name)
def test_every_sweep_run_is_a_valid_train_command(sweep_file):
    import itertools

    from rims_rl.cli import build_parser
    from rims_rl.cli.train import _resolve, _train_flags

    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["method"] == "grid" and sweep["command"][1:3] == ["rims-rl", "train"]
    fixed = [arg for arg in sweep["command"][3:] if not arg.startswith("${")]
    params = sweep["parameters"]
    assert params["policy"]["values"] == ["rims", "lstm"] and len(params["seed"]["values"]) >= 3
    names = sorted(params)
    for values in itertools.product(*(params[n]["values"] for n in names)):
        argv = ["train", *fixed, *(f"--{n.replace('_', '-')}={v}" for n, v in zip(names, values, strict=True))]
        args = build_parser().parse_args(argv)
        cfg, _ = _resolve(args, _train_flags(args))
        assert (cfg.env, cfg.policy, cfg.seed, cfg.wandb.mode) == (args.env, args.policy, args.seed, "online")
