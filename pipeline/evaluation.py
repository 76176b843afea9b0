"""Frozen-feature evaluation: weighted kNN for k in 10, 20, 100, 200 (as dinov2) and a linear probe (logistic
regression), on labelled shards, for the pretrained encoder and, with the same protocol, a randomly initialised one
and raw pixels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.data.torch_loader import iter_eval_batches
from pipeline.distributed import DistEnv


@torch.no_grad()
def extract(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], cfg: Config, shards: str | Path, env: DistEnv,
            device: torch.device, max_samples: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features of every function in ``fns`` for the labelled ``shards``, in one pass over them (each rank reads
    its part); every rank gets all of them, in rank order: {name: (features, labels)}."""
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in fns}
    labels = []
    for batch in iter_eval_batches(cfg, shards, env, device, max_samples):
        for name, fn in fns.items():
            feats[name].append(fn(batch.views[0]).float().cpu())
        labels.append(batch.labels.cpu())
    local = ({n: torch.cat(f).numpy() for n, f in feats.items()}, torch.cat(labels).numpy()) if labels else None
    parts = [local]
    if env.world_size > 1 and dist.is_initialized():
        parts = [None] * env.world_size
        dist.all_gather_object(parts, local)
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError(f"{shards}: no labelled samples to evaluate on")
    y = np.concatenate([p[1] for p in parts])
    return {name: (np.concatenate([p[0][name] for p in parts]), y) for name in fns}


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 ks: tuple[int, ...] = (10, 20, 100, 200), temperature: float = 0.07,
                 chunk: int = 1024) -> dict[int, float]:
    """Weighted kNN accuracy for each k, as dinov2 ``eval/knn.py`` (and DINO's ``eval_knn.py``, Wu et al. 2018):
    cosine similarity to the training features, the top max(k) neighbours, each voting for its label with weight
    softmax(sim / T) over those neighbours; the prediction for k sums the first k votes. (The softmax is exp(sim/T)
    up to a per-query constant, so every k ranks classes as DINO's exp(sim/T) votes do.)"""
    tx = F.normalize(torch.from_numpy(train_x).float(), dim=1)
    ty = torch.from_numpy(train_y).long()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    kmax = min(max(ks), len(tx))
    correct = dict.fromkeys(ks, 0)
    for i in range(0, len(test_x), chunk):
        q = F.normalize(torch.from_numpy(test_x[i:i + chunk]).float(), dim=1)
        sim, idx = (q @ tx.T).topk(kmax, dim=1)
        votes = F.one_hot(ty[idx], num_classes) * (sim / temperature).softmax(dim=1).unsqueeze(-1)  # B x kmax x C
        cumulative = votes.cumsum(dim=1)
        labels = torch.from_numpy(test_y[i:i + chunk])
        for k in ks:
            correct[k] += (cumulative[:, min(k, kmax) - 1].argmax(1) == labels).sum().item()
    return {k: correct[k] / len(test_x) for k in ks}


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          max_iter: int = 1000) -> float:
    """Multinomial logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def raw_pixels(views: torch.Tensor) -> torch.Tensor:
    """Flattened eval view; one channel when the image is grey (the three channels are equal)."""
    if torch.equal(views[:, 0], views[:, 1]) and torch.equal(views[:, 1], views[:, 2]):
        views = views[:, :1]
    return views.flatten(1)


def score(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], cfg: Config) -> dict[str, float]:
    """Linear-probe and kNN accuracy (one entry per k, ``knn_k{k}``) of features fitted on ``train``, scored on
    ``test``."""
    e = cfg.eval
    knn = knn_accuracy(*train, *test, ks=tuple(e.knn_k), temperature=e.knn_temperature)
    return {"linear_probe": linear_probe_accuracy(*train, *test, max_iter=e.probe_max_iter),
            **{f"knn_k{k}": acc for k, acc in knn.items()}}


def evaluate(cfg: Config, encoder: torch.nn.Module, env: DistEnv, device: torch.device,
             random_init: torch.nn.Module | None = None) -> dict | None:
    """Score the encoder and, if ``eval.baselines``, a random-init encoder and raw pixels. Collective.

    The random-init encoder is ``random_init`` when given (for example the method's own encoder before training:
    MoCo v3 and MAE fix a sin-cos position embedding, I-JEPA has no class token), else ``model`` as timm
    initialises it.

    Rank 0 gets ``{metric: {encoder: accuracy}}`` for the metrics ``linear_probe`` and ``knn_k{k}`` (each k of
    ``eval.knn_k``), encoders ``pretrained`` and, with baselines, ``random_init`` and ``raw_pixels``; plus
    ``knn_temperature``, ``num_train`` and ``num_test``. Other ranks get None. The shards are read once for all
    encoders, and with several ranks each rank fits the probes of its share of the encoders."""
    from pipeline.models import build_encoder

    was_training = encoder.training
    encoder.eval()
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"pretrained": encoder}
    if cfg.eval.baselines:
        if random_init is None:
            torch.manual_seed(cfg.run.seed + 12345)
            random_init = build_encoder(cfg.model)
        fns["random_init"] = random_init.to(device).eval()
        fns["raw_pixels"] = raw_pixels
    with torch.no_grad():
        train = extract(fns, cfg, cfg.data.eval_train_shards, env, device, cfg.eval.max_train_samples)
        test = extract(fns, cfg, cfg.data.eval_test_shards, env, device)
    encoder.train(was_training)
    distributed = env.world_size > 1 and dist.is_initialized()
    names = list(fns)
    mine = {n: score(train[n], test[n], cfg) for n in (names[env.rank::env.world_size] if distributed else names)}
    if distributed:
        parts: list = [None] * env.world_size
        dist.all_gather_object(parts, mine)
        mine = {k: v for p in parts for k, v in p.items()}
    if not env.is_main:
        return None
    results = {n: mine[n] for n in names}
    metrics = list(results["pretrained"])
    return {metric: {name: r[metric] for name, r in results.items()} for metric in metrics} | {
        "knn_temperature": cfg.eval.knn_temperature, "num_train": len(train["pretrained"][1]),
        "num_test": len(test["pretrained"][1])}


@torch.no_grad()
def zero_shot_accuracy(cfg: Config, method: torch.nn.Module, shards: str | Path, env: DistEnv,
                       device: torch.device, max_samples: int = 0) -> float:
    """Top-1 accuracy of an image-text method (``zero_shot_classifier`` + ``encode_image``) on labelled shards:
    class embeddings from the prompt templates ``method.clip.zero_shot_templates`` filled with the class names of
    the shards' manifest. Collective when distributed; every rank gets the result."""
    from pipeline.data.sources import resolve_for_job

    classes = resolve_for_job(shards, cfg.data, where="data.eval_test_shards", progress=False).classes
    if not classes:
        raise ValueError(f"{shards}: the manifest names no classes, so there is nothing to prompt with")
    classifier = method.zero_shot_classifier(classes)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in iter_eval_batches(cfg, shards, env, device, max_samples):
        pred = (method.encode_image(batch.views[0]) @ classifier.T).argmax(dim=1)
        counts += torch.tensor([(pred == batch.labels).sum().item(), len(pred)], dtype=torch.float64, device=device)
    if env.world_size > 1 and dist.is_initialized():
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])
