"""The Half-Cheetah imitation comparison (paper Table 6), resumably: methods x seeds, trained, evaluated, tabled.

    python scripts/cheetah_table.py [--demos demos/cheetah-40.npz] [--methods lstm rims-k3 rims-k6] [--seeds 0 1 2]
                                    [--perturb joints joints:0.5] [--episodes 5] [--jobs 2] [--out runs/cheetah_table]
                                    [--set KEY=VALUE ...]

Records the demonstrations first if the file is missing (``rims-rl demos``: the shipped expert, ``--demo-episodes``
episodes, seeds 0, 1, ...). Each run is ``rims-rl imitate`` with ``configs/cheetah.yaml`` (4 epochs of behaviour
cloning, then 8 DAgger rounds; ``--set`` changes any key for every run, e.g. ``--set dagger.rounds=0 epochs=12``
for plain BC) and the method's core: ``gru``/``lstm`` (600 units) or ``rims-kN`` (6 units x 100, k_active N).
Then each run is evaluated on ``--episodes`` episodes (env seeds 10000 + seed, ...) unperturbed and under every
``--perturb`` spec, the results kept in the run's ``perturb.json``.

A finished run is read, not retrained; a stopped one continues from its newest epoch; an evaluation already in
``perturb.json`` with enough episodes is not replayed. So the script can be stopped (Ctrl-C: the runs checkpoint) and
started again. ``--jobs N`` trains N runs at once, one torch thread each. Prints, and writes to ``OUT/table.md`` and
``OUT/perturbation.png``, ``rims-rl imitation-table``'s table and figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from _jobs import run_jobs  # scripts/_jobs.py

METHOD = re.compile(r"^(gru|lstm|rims-k(\d+))$")


def method_flags(method: str) -> dict:
    match = METHOD.match(method)
    if match is None:
        raise ValueError(method)
    if match.group(2):
        return {"policy": "rims", "rim.k_active": int(match.group(2))}
    return {"policy": method}


def run_one(run_dir: str, method: str, seed: int, demos: str, overrides: list[str], specs: list[str], episodes: int):
    """Train (or continue) one run, then evaluate what ``perturb.json`` lacks; None if a signal stopped it."""
    import torch

    torch.set_num_threads(1)
    import yaml

    from rims_rl.agents.callbacks import GracefulStop
    from rims_rl.agents.imitation import (
        ImitationInterrupted,
        evaluate_pixel_policy,
        load_imitation_run,
        record_perturb,
        train_imitation,
    )
    from rims_rl.config import ImitationConfig, resolve_imitation_config

    path = Path(run_dir)
    meta = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
    if meta.get("status") != "finished":
        resume = (path / "checkpoint.pt").is_file()
        if resume:
            cfg = ImitationConfig.model_validate(yaml.safe_load((path / "config.yaml").read_text()))
        else:
            flags = {**method_flags(method), "seed": seed, "demos": demos, "device": "cpu", "eval_episodes": 0,
                     "wandb.mode": "disabled"}  # fmt: skip
            cfg = resolve_imitation_config(flags=flags, overrides=overrides)
        stop = GracefulStop()
        stop.install()
        try:
            train_imitation(cfg, path, resume=resume, stop=stop)
        except ImitationInterrupted:
            return None
        finally:
            stop.uninstall()
    cfg, policy = load_imitation_run(path)
    done = json.loads((path / "perturb.json").read_text()) if (path / "perturb.json").is_file() else {}
    todo = [s for s in specs if len(done.get(s, {}).get("returns", [])) < episodes]
    results = [
        evaluate_pixel_policy(
            policy, perturb=s, episodes=episodes, seed=cfg.seed + 10_000, max_steps=cfg.eval_max_steps
        )
        for s in todo
    ]
    record_perturb(path, results)
    return json.loads((path / "perturb.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demos", type=Path, default=Path("demos/cheetah-40.npz"))
    parser.add_argument("--demo-episodes", type=int, default=40, help="episodes to record if --demos is missing")
    parser.add_argument("--methods", nargs="+", default=["lstm", "rims-k3", "rims-k6"], help="gru, lstm or rims-kN")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--perturb", nargs="+", default=["joints", "joints:0.5"], metavar="SPEC")
    parser.add_argument("--episodes", type=int, default=5, help="evaluation episodes per spec (default 5)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs trained at once")
    parser.add_argument("--out", type=Path, default=Path("runs/cheetah_table"))
    args = parser.parse_args()
    bad = [m for m in args.methods if not METHOD.match(m)]
    if bad:
        parser.error(f"unknown method {' '.join(bad)}: valid are gru, lstm and rims-kN (N active units of 6)")
    from rims_rl.envs.cheetah import parse_perturb

    specs = ["none"] + [s for s in args.perturb if s != "none"]
    for spec in specs:
        try:
            parse_perturb(spec)
        except ValueError as err:
            parser.error(str(err))
    if not args.demos.is_file():
        from rims_rl.agents.imitation import record_demos
        from rims_rl.cli.imitation import DEFAULT_EXPERT

        print(f"recording {args.demo_episodes} demonstration episodes -> {args.demos}")
        record_demos(DEFAULT_EXPERT, args.demo_episodes).save(args.demos)
    runs = {
        (m, s): (str(args.out / f"{m}-s{s}"), m, s, str(args.demos), args.overrides, specs, args.episodes)
        for s in args.seeds  # seed-major: a stopped comparison has as many seeds of every method as possible
        for m in args.methods
    }
    run_jobs(run_one, runs, args.jobs)

    from rims_rl.agents.reports import imitation_groups, imitation_table, plot_imitation

    groups = imitation_groups([Path(r[0]) for r in runs.values()])
    table = imitation_table(groups, specs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    plot_imitation(groups, specs, args.out / "perturbation.png")
    print(table)
    print(f"-> {args.out / 'table.md'}, {args.out / 'perturbation.png'}")


if __name__ == "__main__":
    main()
