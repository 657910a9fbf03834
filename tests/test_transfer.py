"""Atari transfer: the score on hand-made curves, weights across action sets, freezing, and the resumable matrix."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch as th
import yaml

from rims_rl.agents.training import ConfigRejected, prepare
from rims_rl.agents.transfer import HEAD_PREFIXES, transfer_score
from rims_rl.cli import build_parser, main
from rims_rl.config import CONFIG_DIR, resolve_config

STEPS = np.array([0.0, 100.0, 200.0, 300.0])


# ---- the score ---------------------------------------------------------------------------------------------------
def test_identical_curves_score_100_and_a_higher_curve_more():
    curve = np.array([1.0, 5.0, 3.0, 8.0])
    assert transfer_score((STEPS, curve), (STEPS, curve)) == pytest.approx(100.0)
    assert transfer_score((STEPS, curve), (STEPS, curve), baseline=-2.0) == pytest.approx(100.0)
    assert transfer_score((STEPS, curve + 1.0), (STEPS, curve)) > 100.0
    assert transfer_score((STEPS, curve - 0.5), (STEPS, curve)) < 100.0
    # negative scores (Boxing): above the random agent's score, a uniformly higher curve still scores > 100
    boxing = np.array([-20.0, -15.0, -10.0, -12.0])
    assert transfer_score((STEPS, boxing + 3.0), (STEPS, boxing), baseline=-25.0) > 100.0


def test_score_is_the_ratio_of_areas_above_the_baseline():
    scratch = np.array([0.0, 10.0, 10.0, 10.0])  # average over [0, 300]: (5 + 10 + 10) / 3 = 25/3
    finetuned = np.array([10.0, 10.0, 10.0, 10.0])  # average 10
    assert transfer_score((STEPS, finetuned), (STEPS, scratch)) == pytest.approx(100 * 10 / (25 / 3))
    assert transfer_score((STEPS, finetuned), (STEPS, scratch), baseline=5.0) == pytest.approx(
        100 * (10 - 5) / (25 / 3 - 5)
    )
    assert math.isnan(transfer_score((STEPS, finetuned), (STEPS, scratch), baseline=9.0))  # scratch below baseline
    assert math.isnan(transfer_score((STEPS[:0], finetuned[:0]), (STEPS, scratch)))


def test_window_is_the_overlap_of_the_two_curves_unless_given():
    # the fine-tuned curve starts logging at step 100 and runs longer: the window is [100, 300]
    ft_steps, ft = np.array([100.0, 200.0, 300.0, 400.0]), np.array([4.0, 4.0, 4.0, 100.0])
    sc = np.array([0.0, 2.0, 2.0, 2.0])  # average over [100, 300] = 2 (the ramp before 100 is outside)
    assert transfer_score((ft_steps, ft), (STEPS, sc)) == pytest.approx(200.0)
    # an explicit window: [0, 200] clips the fine-tuned curve to where it exists ([100, 200]: 4), scratch averages 1.5
    assert transfer_score((ft_steps, ft), (STEPS, sc), start=0, end=200) == pytest.approx(100 * 4 / 1.5)
    assert math.isnan(transfer_score((np.array([500.0]), np.array([1.0])), (STEPS, sc)))  # no overlap


# ---- weights -------------------------------------------------------------------------------------------------------
def _atari(env: str, policy: str, *extra: str):
    return resolve_config(
        env, CONFIG_DIR / "atari.yaml",
        overrides=[f"policy={policy}", "n_envs=2", "ppo.n_steps=16", "ppo.batch_size=32", "ppo.n_epochs=1",
                   "wandb.mode=disabled", "device=cpu", *extra],
    )  # fmt: skip


@pytest.mark.parametrize("policy", ["rims", "lstm"])
def test_source_weights_load_into_a_target_with_another_action_set_and_features_match(policy, tmp_path):
    source = prepare(_atari("PongNoFrameskip-v4", policy))
    source.model.save(tmp_path / "pong.zip")
    source.env.close()
    target = prepare(_atari("AlienNoFrameskip-v4", policy, f"transfer.source={tmp_path / 'pong.zip'}"))
    target.env.close()
    src, tgt = source.model.policy, target.model.policy
    assert src.action_net.out_features == 6 and tgt.action_net.out_features == 18
    src_state, tgt_state = src.state_dict(), tgt.state_dict()
    carried = [k for k in tgt_state if not k.startswith(HEAD_PREFIXES)]
    assert any("features_extractor" in k for k in carried)
    assert any(k.startswith(("lstm_actor", "rim_actor")) for k in carried)
    assert all(th.equal(src_state[k], tgt_state[k]) for k in carried)
    assert not th.equal(src_state["value_net.weight"], tgt_state["value_net.weight"])  # a fresh value head

    obs = th.randint(0, 256, (5, *target.model.observation_space.shape), dtype=th.uint8).float()
    starts = th.zeros(5)
    with th.no_grad():
        f_src, f_tgt = src.extract_features(obs), tgt.extract_features(obs)
        assert th.equal(f_src, f_tgt)
        states = (th.zeros(1, 5, src.lstm_actor.hidden_size), th.zeros(1, 5, src.lstm_actor.hidden_size))
        core_src, _ = src._process_sequence(f_src, states, starts, src.lstm_actor)
        core_tgt, _ = tgt._process_sequence(f_tgt, states, starts, tgt.lstm_actor)
    assert th.equal(core_src, core_tgt)  # the recurrent core reads and computes exactly as in the source


def test_a_source_of_another_kind_is_refused(tmp_path):
    source = prepare(_atari("PongNoFrameskip-v4", "lstm"))
    source.model.save(tmp_path / "pong_lstm.zip")
    source.env.close()
    with pytest.raises(ConfigRejected, match=r"pong_lstm.zip is not a network of the target's kind"):
        prepare(_atari("AlienNoFrameskip-v4", "rims", f"transfer.source={tmp_path / 'pong_lstm.zip'}"))
    with pytest.raises(ConfigRejected, match=r"has no model"):
        prepare(_atari("AlienNoFrameskip-v4", "rims", f"transfer.source={tmp_path / 'missing'}"))


@pytest.mark.parametrize(
    ("mode", "trains"),
    [("finetune-head", {"action_net", "value_net"}), ("frozen-features", {"rim_actor", "action_net", "value_net"})],
)
def test_frozen_weights_stay_the_sources_through_training(mode, trains, tmp_path):
    source = prepare(_atari("PongNoFrameskip-v4", "rims"))
    source.model.save(tmp_path / "pong.zip")
    source.env.close()
    target = prepare(_atari("AsterixNoFrameskip-v4", "rims", f"transfer.source={tmp_path / 'pong.zip'}",
                            f"transfer.mode={mode}"))  # fmt: skip
    before = {k: v.clone() for k, v in target.model.policy.state_dict().items()}
    target.model.learn(64)
    target.env.close()
    after = target.model.policy.state_dict()
    changed = {k.split(".")[0] for k in after if not th.equal(before[k], after[k])}
    assert changed == trains


# ---- the matrix, end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("transfer")
    for policy in ("rims", "lstm"):
        argv = ["transfer", "--protocol", "rusu2016", "--policy", policy, "--sources", "Pong", "--targets", "Alien",
                "--preset", "smoke", "--random-episodes", "2", "--out", str(root), "--wandb", "disabled",
                "--no-progress"]  # fmt: skip
        assert main(argv) == 0
    return root


def test_protocol_writes_the_matrix_table_png_and_counts_per_policy(matrix):
    for policy in ("rims", "lstm"):
        out = matrix / policy / "finetune-all"
        rows = (out / "matrix.csv").read_text().splitlines()
        assert rows[0] == "target,Pong,mean_over_sources" and [r.split(",")[0] for r in rows[1:]] == ["Alien"]
        assert "| Alien |" in (out / "matrix.md").read_text()
        assert (out / "matrix.png").read_bytes()[:4] == b"\x89PNG"
        counts = json.loads((out / "counts.json").read_text())
        assert counts["targets"]["total"] == 1 and sum(counts["targets"][k] for k in ("positive", "negative",
                                                                                       "undefined")) == 1  # fmt: skip
        for target in ("Alien",):
            cell = json.loads((out / f"Pong-to-{target}" / "cell.json").read_text())
            assert cell["seeds"] == [0] and cell["policy"] == policy
            ft = yaml.safe_load((out / f"Pong-to-{target}" / "s0" / "config.yaml").read_text())
            assert ft["transfer"]["source"] == str((matrix / policy / "source" / "Pong" / "s0" / "model.zip").resolve())
            assert ft["env"] == f"{target}NoFrameskip-v4" and ft["total_timesteps"] == 2048
            if cell["scores"][0] is not None:  # defined: the score recomputes from the two runs' areas
                expected = (
                    100 * (cell["auc_finetuned"][0] - cell["baseline"]) / (cell["auc_scratch"][0] - cell["baseline"])
                )
                assert cell["scores"][0] == pytest.approx(expected)
    summary = (matrix / "summary_finetune-all.md").read_text()
    assert "| rims |" in summary and "| lstm |" in summary
    assert set(json.loads((matrix / "random_scores.json").read_text())) == {"AlienNoFrameskip-v4"}


def test_running_the_protocol_again_skips_finished_cells(matrix, capsys):
    runs = sorted(matrix.glob("rims/**/run.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    argv = ["transfer", "--protocol", "rusu2016", "--policy", "rims", "--sources", "Pong", "--targets", "Alien",
            "--preset", "smoke", "--random-episodes", "2", "--out", str(matrix),
            "--wandb", "disabled"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (finished)") == 1 and "trained" not in printed
    assert [p.stat().st_mtime_ns for p in runs] == stamps


def test_transfer_sweep_runs_are_valid_transfer_commands():
    sweep = yaml.safe_load((CONFIG_DIR / "sweeps" / "transfer.yaml").read_text())
    assert sweep["command"][1:3] == ["rims-rl", "transfer"]
    fixed = [a for a in sweep["command"][3:] if not a.startswith("${")]
    params = sweep["parameters"]
    assert params["source"]["values"] == ["Pong", "Riverraid", "Seaquest"] and len(params["target"]["values"]) == 12
    for policy, source, target in itertools.product(*(params[k]["values"] for k in ("policy", "source", "target"))):
        args = build_parser().parse_args(["transfer", *fixed, f"--policy={policy}", f"--source={source}",
                                          f"--target={target}"])  # fmt: skip
        assert (args.policy, args.source, args.target, args.preset) == (policy, source, target, "paper")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "rims"], "give --source GAME and --target GAME for one cell, or --protocol rusu2016"),
        (["--policy", "rims", "--source", "Pong", "--target", "Zork"], "'Zork' is not an Atari game"),
        (["--policy", "rims", "--source", "Pong", "--target", "Pong"], "--source and --target are the same game"),
        (["--policy", "rims", "--protocol", "rusu2016", "--source", "Pong"], "--protocol runs its own sources"),
        (["--policy", "rims", "--source", "Pong", "--target", "Alien", "--seeds", "1", "1"],
         "--seeds must be distinct"),
        (["--policy", "rims", "--source", "Pong", "--target", "Alien", "--set", "rim.k_actve=3"],
         "unknown config key 'rim.k_actve'"),
        (["--policy", "rims", "--source", "Pong", "--target", "Alien", "--total-timesteps", "0"],
         "--total-timesteps must be >= 1"),
    ],
)  # fmt: skip
def test_bad_transfer_input_gets_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["transfer", *argv, "--out", str(tmp_path / "t")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "t").exists()


def test_a_cells_runs_are_reused_when_finished_resumed_when_interrupted_and_never_overwritten(tmp_path):
    import signal

    from rims_rl.agents.training import TrainingInterrupted, train
    from rims_rl.agents.transfer_suite import TransferRejected, TransferSettings, ensure_run
    from tests.test_training import SignalAt, tiny_config

    cfg, run_dir = tiny_config(), tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(cfg, run_dir, callbacks=[SignalAt(signal.SIGINT, step=64)])
    settings = TransferSettings(root=tmp_path, policy=cfg.policy)
    assert ensure_run(cfg, run_dir, settings) == "resumed"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["timesteps"] == cfg.total_timesteps and len(meta["resumes"]) == 1
    assert ensure_run(cfg, run_dir, settings) == "reused"
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    with pytest.raises(TransferRejected, match="holds a run with another config"):
        ensure_run(other, run_dir, settings)
