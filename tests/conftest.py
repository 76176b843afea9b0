from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

# FASHION_MNIST_DIR: the same IDX files elsewhere (the GPU run carries a subset: benchmarks/gpu/README.md)
FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
pytest_plugins = ["tests.data_servers"]  # s3_server, http_server, wds_shards, img2dataset_shards


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> dict[str, Path]:
    """Real Fashion-MNIST shards: 2048 train samples in 8 uneven shards (300 each, last 248), 512 test."""
    from pipeline.data.shards import FASHION_MNIST_CLASSES, Item, read_idx, write_shards

    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("fmnist")
    out = {}
    for split, prefix, n in (("train", "train", 2048), ("test", "t10k", 512)):
        imgs = read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labs = read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        items = [Item(f"{split}[{i}]", imgs[i], "png", int(labs[i])) for i in range(n)]
        write_shards(items, root / split, shard_size=300, classes=FASHION_MNIST_CLASSES, progress=False)
        out[split] = root / split
    return out


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """Write a uint8 array as a gzipped IDX file (the format of the Fashion-MNIST files)."""
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes())
    return path


def tiny_overrides(shards: dict[str, Path], run_dir: Path, **extra) -> list[str]:
    """Overrides that turn configs/quickstart.yaml into a seconds-long run."""
    base = {
        "run.output_dir": str(run_dir.parent), "run.name": run_dir.name,
        "data.train_shards": str(shards["train"]), "data.eval_train_shards": str(shards["train"]),
        "data.eval_test_shards": str(shards["test"]),
        "loader.batch_size": 32, "loader.num_workers": 1, "loader.shuffle_buffer": 64,
        "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
        "method.proj_hidden_dim": 64, "method.proj_dim": 32,
        "train.steps": 6, "optim.warmup_steps": 2, "checkpoint.every_steps": 3, "metrics.log_every": 2,
        "metrics.progress": False, "metrics.tensorboard": False, "eval.at_end": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
