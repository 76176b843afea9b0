"""Every method, same CPU budget, on Fashion-MNIST: pretrain, export, then kNN and linear-probe accuracy of the
frozen exported encoder, against a randomly initialised encoder and raw pixels (same protocol).

    PYTHONPATH=$PWD python benchmarks/methods_fmnist.py --steps 600 --out benchmarks/results/methods_fmnist_600

Needs ``apt-get install -y dataset-fashion-mnist``. Writes ``results.json`` and ``results.md`` into ``--out``
(and, per method, the run directory under ``--out/runs``). Each method trains from its CPU preset
``configs/<method>.yaml`` in one process with the overrides below, so the budget (steps x batch) is identical.
CLIP trains on the same images with templated captions and also reports zero-shot accuracy.

``--methods a,b`` trains only those and adds their rows to an existing ``results.json`` of the same budget (a
different budget is refused), so a new method joins the table without re-running the others; several processes
may add rows to the same ``--out`` at once. Each row is scored against the method's own encoder at initialisation.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import random
import sys
import time
from pathlib import Path

import torch

from pipeline.config import FMNIST_TEMPLATES, load_config
from pipeline.data.shards import FASHION_MNIST_CLASSES, Item, read_idx, write_shards
from pipeline.distributed import read_dist_env
from pipeline.evaluation import evaluate, zero_shot_accuracy
from pipeline.export import load_exported
from pipeline.methods import METHODS, build_method
from pipeline.trainer import seed_everything, train

FMNIST = Path("/usr/share/datasets/fashion-mnist")
METRICS = ("linear_probe", "knn_k10", "knn_k20", "knn_k100", "knn_k200")
"""Columns of the table: the evaluation's metrics (pipeline.evaluation.evaluate, eval.knn_k at its default)."""


def write_fmnist(root: Path, n_train: int, n_test: int) -> dict[str, Path]:
    """Labelled shards (train, test) and captioned train shards (one template per image, seeded)."""
    out = {"train": root / "train", "test": root / "test", "captions": root / "captions"}
    if all((p / "manifest.json").exists() for p in out.values()):
        return out
    rng = random.Random(0)
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        imgs = read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labs = read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        items = [Item(f"{split}[{i}]", imgs[i], "png", int(labs[i])) for i in range(n)]
        write_shards(items, out[split], shard_size=1000, classes=FASHION_MNIST_CLASSES, progress=False)
        if split == "train":
            caps = [Item(f"{split}[{i}]", imgs[i], "png", int(labs[i]),
                         rng.choice(FMNIST_TEMPLATES).format(FASHION_MNIST_CLASSES[int(labs[i])].lower()))
                    for i in range(n)]
            write_shards(caps, out["captions"], shard_size=1000, classes=FASHION_MNIST_CLASSES, progress=False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)  # the CPU presets' own schedule
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--test-samples", type=int, default=2000)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="benchmarks/results/methods_fmnist_600")
    ap.add_argument("--table-only", action="store_true", help="rewrite results.md from results.json")
    args = ap.parse_args()
    if args.table_only:
        write_table(json.loads((Path(args.out) / "results.json").read_text()), Path(args.out) / "results.md")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        shards = write_fmnist(out / "data", args.train_samples, args.test_samples)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    budget = {"steps": args.steps, "batch_size": args.batch_size, "train_samples": args.train_samples,
              "test_samples": args.test_samples}
    old = {k: results.get("setup", {}).get(k) for k in budget}
    if results and "rows" not in results:
        raise SystemExit(f"{results_file} is in the format before per-method random-init baselines: pick another "
                         "--out")
    if "setup" in results and old != budget:
        raise SystemExit(f"{results_file} holds rows at another budget ({old}); a row at {budget} would not be "
                         "comparable: rerun with that budget or pick another --out")
    env, device = read_dist_env(), torch.device("cpu")
    torch.set_num_threads(1)  # one thread: the 2-core machine is shared, more threads only thrash
    command = " ".join(["python"] + sys.argv)
    for name in args.methods.split(","):
        preset = f"configs/{name}.yaml"
        cfg = load_config(preset, [
            f"run.output_dir={out / 'runs'}", f"run.name={name}", "checkpoint.resume=auto",
            f"data.train_shards={shards['captions' if name == 'clip' else 'train']}",
            f"data.eval_train_shards={shards['train']}", f"data.eval_test_shards={shards['test']}",
            f"train.steps={args.steps}", f"loader.batch_size={args.batch_size}", "optim.warmup_steps=20",
            f"checkpoint.every_steps={args.steps}", "metrics.progress=false", "metrics.tensorboard=false",
            "eval.at_end=false", "eval.baselines=true", "train.threads=1",
        ])
        # The random-init baseline is the method's own encoder as training starts from it (same seed as
        # trainer.train): the architecture differs between methods (I-JEPA has no class token; MoCo v3 and MAE fix
        # a sin-cos position embedding), and a baseline of another architecture says nothing about this one.
        seed_everything(cfg.run.seed)
        initial = build_method(cfg).encoder
        t0 = time.perf_counter()
        summary = train(cfg)
        minutes = (time.perf_counter() - t0) / 60
        encoder = load_exported(summary["export"])
        scores = evaluate(cfg, encoder, env, device, random_init=initial)
        row = {"pretrained": {m: scores[m]["pretrained"] for m in METRICS},
               "random_init": {m: scores[m]["random_init"] for m in METRICS},
               "final_loss": summary.get("final_loss"), "train_minutes": round(minutes, 2)}
        if name == "clip":
            method = build_method(cfg)
            from pipeline.engines.ddp import DDPEngine

            state = DDPEngine.read_model_state(Path(summary["checkpoint"]), method)
            method.load_state_dict(state)
            row["zero_shot"] = zero_shot_accuracy(cfg, method.eval(), cfg.data.eval_test_shards, env, device)
        with _locked(out):  # another process may be adding rows to the same file: merge into what is there now
            results = json.loads(results_file.read_text()) if results_file.exists() else {"rows": {}}
            results["rows"][name] = row
            results["raw_pixels"], results["setup"] = {m: scores[m]["raw_pixels"] for m in METRICS}, budget
            results["commands"] = sorted(set(results.get("commands", [])) | {command})
            tmp = results_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(results_file)
            write_table(results, out / "results.md")
        print(name, row, flush=True)
    return 0


@contextlib.contextmanager
def _locked(out: Path):
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_table(results: dict, path: Path) -> None:
    s = results["setup"]
    title = (f"# Methods on Fashion-MNIST, CPU, equal budget: {s['steps']} steps x batch {s['batch_size']} "
             f"(1 process), {s['train_samples']} train / {s['test_samples']} test images")
    lines = [title, "", "Reproduce (each command adds its methods' rows):", "", "```",
             *(f"PYTHONPATH=$PWD {c}" for c in results["commands"]), "```", "",
             ("Random init is each method's own encoder before training (same seed and architecture); raw pixels "
              "are the normalised images, flattened."), "",
             ("| encoder | linear probe | kNN k=10 | kNN k=20 | kNN k=100 | kNN k=200 | random init: probe / kNN k=20 "
              "| beats random init (probe / kNN k=20) | zero-shot | final loss | train min |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    yes = {True: "yes", False: "no"}
    for name, r in results["rows"].items():
        p, b = r["pretrained"], r["random_init"]
        zs = f"{r['zero_shot']:.3f}" if "zero_shot" in r else ""
        lines.append(f"| {name} | " + " | ".join(f"{p[m]:.3f}" for m in METRICS) +
                     f" | {b['linear_probe']:.3f} / {b['knn_k20']:.3f}"
                     f" | {yes[p['linear_probe'] > b['linear_probe']]} / {yes[p['knn_k20'] > b['knn_k20']]}"
                     f" | {zs} | {r['final_loss']:.4f} | {r['train_minutes']} |")
    raw = results["raw_pixels"]
    lines.append("| raw pixels (baseline) | " + " | ".join(f"{raw[m]:.3f}" for m in METRICS) + " |  |  |  |  |  |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
