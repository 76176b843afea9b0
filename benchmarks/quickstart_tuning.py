"""Tune the quickstart: train variants of configs/quickstart.yaml on Fashion-MNIST and score the frozen encoder
at several points of each run (linear probe, kNN per k), against raw pixels and a random-init encoder.

    PYTHONPATH=$PWD python benchmarks/quickstart_tuning.py --out benchmarks/results/quickstart_tuning \\
        --variant base= --variant avgpool=model.global_pool=avg --steps 400 --eval-at 200,400 --seeds 0,1

Each ``--variant NAME=OVERRIDES`` (dotted overrides separated by spaces; empty for the preset) trains once per
seed in one process with the quickstart's global batch (``loader.batch_size`` x ``launcher.nprocs`` of the preset
unless overridden: NT-Xent and the head BatchNorm see the same global batch as the 2-process run), and every
checkpoint named by ``--eval-at`` is scored with the quickstart's evaluation (``eval.max_train_samples`` of the
train split to fit, the whole test split to score). The learning-rate schedule spans ``--steps``, so an early point
of a long run is not a short run: runs are compared at equal steps. Results accumulate in ``results.json`` (rows
keyed by variant, seed, step; rerunning a row replaces it) and ``results.md`` (below the hand-written ``notes.md``
of the same folder, if any); ``--plot`` draws accuracy against steps for the variants in ``--plot`` into
``curve.png``. Needs ``make data`` (data/fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.distributed import DistEnv
from pipeline.engines.ddp import DDPEngine
from pipeline.evaluation import evaluate
from pipeline.methods import build_method
from pipeline.trainer import train

METRICS = ("linear_probe", "knn_k10", "knn_k20", "knn_k100", "knn_k200")


def run_variant(name: str, overrides: list[str], seed: int, steps: int, eval_at: list[int], out: Path,
                preset: str, results: dict, threads: int, baselines: bool = True) -> None:
    base = load_config(preset)
    global_batch = base.loader.batch_size * base.launcher.nprocs
    run_name = f"{name}_s{seed}"
    every = min(eval_at) if len(eval_at) == 1 else _gcd(eval_at)
    cfg = load_config(preset, [
        f"loader.batch_size={global_batch}", "launcher.nprocs=1", *overrides,
        f"run.output_dir={out / 'runs'}", f"run.name={run_name}", f"run.seed={seed}", f"train.steps={steps}",
        f"checkpoint.every_steps={every}", f"checkpoint.keep_last={steps // every + 1}", "checkpoint.resume=auto",
        "eval.at_end=false", "metrics.progress=false", "metrics.tensorboard=false", f"train.threads={threads}",
    ])
    t0 = time.perf_counter()
    summary = train(cfg)
    score_checkpoints(cfg, name, seed, overrides, eval_at, out, results, baselines,
                      train_s=time.perf_counter() - t0, final_loss=summary.get("final_loss"))


def score_checkpoints(cfg, name: str, seed: int, overrides: list[str], eval_at: list[int], out: Path, results: dict,
                      baselines: bool, train_s: float | None, final_loss: float | None) -> None:
    """Score the checkpoints ``eval_at`` of the run ``cfg.run.dir`` in this process, one row each."""
    env, device = DistEnv(), torch.device("cpu")
    for step in eval_at:
        key = f"{name}|{seed}|{step}"
        ckpt = Path(cfg.run.dir) / "checkpoints" / f"step_{step:08d}"
        torch.manual_seed(0)
        method = build_method(cfg)
        method.load_state_dict(DDPEngine.read_model_state(ckpt, method))
        need_baselines = baselines and "baselines" not in results and not _has_baselines(out / "results.json")
        cfg.eval.baselines = need_baselines
        t1 = time.perf_counter()
        scores = evaluate(cfg, method.encoder, env, device)
        row = {"variant": name, "seed": seed, "step": step, "overrides": " ".join(overrides),
               "images": step * cfg.loader.batch_size * cfg.launcher.nprocs,
               "train_s_full_run": None if train_s is None else round(train_s, 1),
               "eval_s": round(time.perf_counter() - t1, 1), "final_loss": final_loss}
        row |= {m: scores[m]["pretrained"] for m in METRICS}
        results[key] = row
        if need_baselines:
            results["baselines"] = {b: {m: scores[m][b] for m in METRICS} for b in ("random_init", "raw_pixels")}
            results["baselines"]["fit_on"] = scores["num_train"]
            results["baselines"]["scored_on"] = scores["num_test"]
            m = cfg.model  # random init depends on the encoder: say which one it was
            results["baselines"]["random_init_variant"] = name
            results["baselines"]["random_init_encoder"] = (f"{m.name}, depth {m.depth}, width {m.embed_dim}, "
                                                          f"patch {m.patch_size}, pool {m.global_pool}")
        print(key, {m: round(row[m], 4) for m in METRICS}, flush=True)
        save(out / "results.json", results)  # each point as it is scored: a long run stopped early keeps its curve


def _has_baselines(results_file: Path) -> bool:
    return results_file.exists() and "baselines" in json.loads(results_file.read_text())


def _gcd(values: list[int]) -> int:
    import math

    g = 0
    for v in values:
        g = math.gcd(g, v)
    return g


def save(results_file: Path, new: dict) -> dict:
    """Merge ``new`` rows into ``results.json`` under a lock (several tuning processes may share one ``--out``),
    rewrite ``results.md``; returns the merged results."""
    import fcntl

    with open(results_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        commands = results.get("commands", [])
        commands += [c for c in new.get("commands", []) if c not in commands]
        results |= {k: v for k, v in new.items() if k != "commands" and not (k == "baselines" and k in results)}
        results["commands"] = commands
        tmp = results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_file)
        write_table(results, results_file.with_name("results.md"))
    return results


def write_table(results: dict, path: Path) -> None:
    rows = [r for k, r in results.items() if k not in ("baselines", "commands")]
    rows.sort(key=lambda r: (r["variant"], r["step"], r["seed"]))
    lines = ["# Quickstart tuning: variants of configs/quickstart.yaml, frozen-encoder accuracy on Fashion-MNIST", ""]
    notes = path.with_name("notes.md")  # hand-written findings, kept above the generated table
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    lines += ["Commands that produced these rows:", ""]
    lines += [f"    {c}" for c in results.get("commands", [])]
    lines += ["", ("| variant | overrides | seed | step | images | linear probe | kNN k=10 | kNN k=20 | kNN k=100 | "
              "kNN k=200 | run s | eval s |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | `{r['overrides']}` | {r['seed']} | {r['step']} | {r['images']} | " +
                     " | ".join(f"{r[m] * 100:.1f}" for m in METRICS) +
                     f" | {r['train_s_full_run'] or '-'} | {r['eval_s'] or '-'} |")
    b = results.get("baselines")
    if b:
        for name in ("raw_pixels", "random_init"):
            lines.append(f"| **{name}** |  |  |  |  | " + " | ".join(f"{b[name][m] * 100:.1f}" for m in METRICS) +
                         " |  |  |")
        variant = b.get("random_init_variant", "the first variant scored")
        lines += ["", (f"Fitted on {b['fit_on']} train images, scored on {b['scored_on']} test images. Random init is "
                       f"the untrained encoder of {variant}: {b.get('random_init_encoder', '?')}.")]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "linear_probe", "linear probe"), (axes[1], "knn_k20", "kNN k=20")):
        for v in variants:
            rows = [r for k, r in results.items() if k not in ("baselines", "commands") and r["variant"] == v]
            steps = sorted({r["step"] for r in rows})
            mean = [sum(r[metric] for r in rows if r["step"] == s) / sum(r["step"] == s for r in rows) for s in steps]
            ax.plot(steps, [m * 100 for m in mean], marker="o", label=v)
        b = results.get("baselines")
        if b:
            ax.axhline(b["raw_pixels"][metric] * 100, color="k", ls="--", label="raw pixels")
            ax.axhline(b["random_init"][metric] * 100, color="gray", ls=":",
                       label=f"random init ({b.get('random_init_variant', 'first variant')})")
        ax.set_xlabel("training steps (global batch 256)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="configs/quickstart.yaml")
    ap.add_argument("--variant", action="append", default=[], help="NAME=dotted overrides separated by spaces")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-at", default="", help="comma-separated steps to score (default: --steps)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="benchmarks/results/quickstart_tuning")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the run is one process)")
    ap.add_argument("--no-baselines", action="store_true", help="leave the baselines to another process")
    ap.add_argument("--plot", default="", help="comma-separated variants to draw into curve.png")
    ap.add_argument("--score-run", default="", help="NAME=RUN_DIR: score the checkpoints --eval-at of a finished run "
                    "(e.g. runs/quickstart of `make quickstart`) with its own config, rows under NAME")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results["commands"] = results.get("commands", [])
    torch.set_num_threads(args.threads)
    eval_at = [int(s) for s in args.eval_at.split(",") if s] or [args.steps]
    if args.variant:
        results["commands"].append(" ".join(["PYTHONPATH=$PWD python"] + [shlex.quote(a) for a in sys.argv]))
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        for seed in (int(s) for s in args.seeds.split(",")):
            mine: dict = {"commands": results["commands"][-1:]}
            run_variant(name, overrides.split(), seed, args.steps, eval_at, out, args.preset, mine, args.threads,
                        not args.no_baselines)
            results = save(results_file, mine)
    if args.score_run:
        name, _, run_dir = args.score_run.partition("=")
        cfg = load_config(Path(run_dir) / "config.yaml", [f"train.threads={args.threads}"])
        mine = {"commands": [" ".join(["PYTHONPATH=$PWD python"] + [shlex.quote(a) for a in sys.argv])]}
        score_checkpoints(cfg, name, cfg.run.seed, [], eval_at, out, mine, not args.no_baselines, None, None)
    results = save(results_file, {})
    if args.plot:
        plot(results, args.plot.split(","), out / "curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
