"""Export the encoder in timm's own folder layout, and load it back.

An export folder is what ``timm.models.push_to_hf_hub`` uploads, written by the same timm code
(``timm.models._hub.save_for_hf`` and ``generate_readme``), so it loads in one line:

- ``config.json``: timm's hub config (``architecture``, ``num_classes``, ``num_features``, ``model_args``,
  ``pretrained_cfg`` with input size, interpolation, crop, mean and std of our eval transform);
- ``model.safetensors``: the encoder's state dict with timm keys (fp32);
- ``README.md``: a model card (method, data, steps, images seen, results, the command that made it);
- ``pipeline.json``: what our own tools need beside it (timm kwargs, method, normalisation, steps, results). timm
  passes unknown top-level keys of ``config.json`` into ``PretrainedCfg``, so they cannot live there.

``timm.create_model('local-dir:EXPORT', pretrained=True)`` loads the folder; once uploaded with huggingface_hub,
``'hf-hub:USER/REPO'`` does. The folder is written as ``EXPORT.partial`` and renamed into place once every file is
complete (files 0644, folder 0755), so a reader never sees half of it; the card is rewritten atomically after
evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pipeline.config import Config, ModelConfig

WEIGHTS, CONFIG, META, CARD = "model.safetensors", "config.json", "pipeline.json", "README.md"
LAYOUT = 2
"""Version of the export layout written to ``pipeline.json`` (1: our own ``config.json``, before timm's layout)."""
_EXPORT_FILES = {WEIGHTS, CONFIG, META, CARD, "pytorch_model.bin"}


class ExportError(ValueError):
    """A folder that is not a usable export (missing, incomplete, or not ours)."""


def encoder_state(method_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a method state dict, with the ``encoder.`` prefix removed (timm keys)."""
    prefix = "encoder."
    return {k[len(prefix):]: v.detach().to("cpu").contiguous() for k, v in method_state.items() if k.startswith(prefix)}


def export_encoder(method_state: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path,
                   extra: dict[str, Any] | None = None, results: dict[str, Any] | None = None) -> Path:
    """Write the encoder of ``method_state`` to ``out_dir`` in timm's layout (see the module docstring).

    ``extra`` goes into ``pipeline.json`` (steps, images_seen, world_size, checkpoint); ``results`` (what
    :func:`pipeline.evaluation.evaluate` returned) into the card. Replaces an earlier export in ``out_dir``; refuses
    to replace a folder that holds anything else. Returns the weights file.
    """
    from timm.models._hub import save_for_hf

    from pipeline.models import build_encoder

    out = Path(out_dir)
    if out.exists() and not _is_export_folder(out):
        raise FileExistsError(f"{out} exists and is not an export folder (it holds other files); "
                              f"choose another output folder")
    weights = encoder_state(method_state)
    if not weights:
        raise ValueError("the method state holds no encoder.* entries to export")
    model = build_encoder(cfg.model)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=True)
    # Our weights are not the timm preset's: drop its tag and license (timm names a model `architecture.tag`, and
    # uses the pretraining method as the tag, e.g. vit_small_patch16_224.dino).
    model.pretrained_cfg = {**{k: v for k, v in model.pretrained_cfg.items() if k not in ("tag", "license")},
                            "tag": cfg.method.name}
    meta = {
        "layout": LAYOUT,
        "architecture": cfg.model.name,
        "timm_kwargs": cfg.model.timm_kwargs(),
        "method": cfg.method.name,
        "image_size": cfg.model.img_size,
        "mean": list(cfg.augment.mean),
        "std": list(cfg.augment.std),
        "train_shards": cfg.data.train_shards,
        "command": cfg.run.command,
        "num_params": sum(p.numel() for p in model.parameters()),
        **(extra or {}),
    }
    if results:
        meta["results"] = results

    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # left by a killed writer
    staging.mkdir(parents=True)
    # the eval transform of the loaders: resize the shorter side to img_size (bilinear), centre crop, normalise
    save_for_hf(model, str(staging), safe_serialization=True, data_config={
        "input_size": (3, cfg.model.img_size, cfg.model.img_size), "interpolation": "bilinear", "crop_pct": 1.0,
        "crop_mode": "center", "mean": tuple(cfg.augment.mean), "std": tuple(cfg.augment.std)})
    (staging / META).write_text(json.dumps(meta, indent=1))
    (staging / CARD).write_text(model_card(meta, out), encoding="utf-8")
    _publish(staging, out)
    return out / WEIGHTS


def write_card(export_dir: str | Path, results: dict[str, Any]) -> None:
    """Record evaluation ``results`` in an export's ``pipeline.json`` and model card (each replaced atomically)."""
    path = Path(export_dir)
    meta = read_export_meta(path)
    meta["results"] = results
    _write_atomic(path / META, json.dumps(meta, indent=1).encode())
    _write_atomic(path / CARD, model_card(meta, path).encode("utf-8"))


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """Our metadata of an export folder: ``pipeline.json``, or the ``config.json`` of a layout-1 export (written
    before exports followed timm's layout: same keys, still loadable by :func:`load_exported`)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"export folder not found: {path}")
    if (path / META).is_file():
        meta = json.loads((path / META).read_text())
    elif (path / CONFIG).is_file() and "timm_kwargs" in (legacy := json.loads((path / CONFIG).read_text())):
        meta = legacy  # layout 1; timm cannot load it: re-run `pipeline export RUN_DIR` to rewrite it
    else:
        raise ExportError(f"{path} is not an export folder of this pipeline (no {META}); export a run with "
                          f"`pipeline export RUN_DIR`")
    if not (path / WEIGHTS).is_file():
        raise ExportError(f"{path} has no {WEIGHTS}")
    return meta


def load_exported(path: str | Path) -> torch.nn.Module:
    """The exported encoder, built from ``pipeline.json`` and loaded strictly, in eval mode.

    The same model as ``timm.create_model('local-dir:PATH', pretrained=True)`` (tested), also for exports written
    before the timm layout."""
    import timm

    path = Path(path)
    meta = read_export_meta(path)
    model = timm.create_model(meta["architecture"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return model.eval()


def model_config_of(path: str | Path) -> ModelConfig:
    meta = read_export_meta(path)
    kw = meta["timm_kwargs"]
    return ModelConfig(name=meta["architecture"], img_size=kw.get("img_size", 224), patch_size=kw.get("patch_size"),
                       embed_dim=kw.get("embed_dim"), depth=kw.get("depth"), num_heads=kw.get("num_heads"),
                       dynamic_img_size=bool(kw.get("dynamic_img_size", False)), global_pool=kw.get("global_pool"),
                       class_token=kw.get("class_token", True), fc_norm=kw.get("fc_norm"),
                       reg_tokens=kw.get("reg_tokens", 0))


# ---------------------------------------------------------------------------------------------------------------
# Model card


def model_card(meta: dict[str, Any], export_dir: str | Path | None = None) -> str:
    """README.md of an export: timm's card generator (front matter, details, usage) plus the results and the
    command. ``results`` are rendered generically (nested dicts of numbers), whatever evaluate() returns."""
    from timm.models._hub import generate_readme

    name = f"{meta['architecture']}.{meta['method']}"
    where = Path(export_dir).as_posix() if export_dir else "path/to/export"
    details: dict[str, Any] = {
        "Model Type": "Image feature backbone (pooled features, no classifier head)",
        "Architecture": f"{meta['architecture']} ({', '.join(f'{k}={v}' for k, v in meta['timm_kwargs'].items())})",
        "Pretraining method": f"{meta['method']} (self-supervised)",
        "Pretraining data": meta.get("train_shards") or "-",
        "Image size": f"{meta['image_size']} x {meta['image_size']}",
    }
    if meta.get("num_params"):
        details["Params (M)"] = f"{meta['num_params'] / 1e6:.2f}"
    for key, label in (("steps", "Steps"), ("images_seen", "Images seen"), ("world_size", "Processes"),
                       ("checkpoint", "Checkpoint")):
        if meta.get(key) is not None:
            details[label] = f"{meta[key]:,}" if isinstance(meta[key], int) else meta[key]
    usage = (
        "```python\n"
        "import timm\n"
        f"model = timm.create_model('local-dir:{where}', pretrained=True)  # or 'hf-hub:USER/REPO' once uploaded\n"
        "model.eval()\n"
        "config = timm.data.resolve_model_data_config(model)\n"
        "transform = timm.data.create_transform(**config, is_training=False)\n"
        "features = model(transform(image).unsqueeze(0))  # (1, num_features)\n"
        "```\n"
    )
    card = generate_readme({
        "tags": ["image-feature-extraction", "timm", "self-supervised", meta["method"]],
        "license": "other",  # set by whoever owns the data and the run; edit before sharing
        "description": f"A {meta['architecture']} encoder pretrained with {meta['method']} by ssl-pipeline. "
                       "The license is not set (`license: other`): edit it before sharing.",
        "details": details,
        "usage": usage,
    }, name, task_name="image-feature-extraction")
    card += "\n## Evaluation\n"
    rows = list(_flatten(meta.get("results") or {}))
    if rows:
        card += "\nFrozen features (kNN, linear probe; fitted and scored on the labelled eval shards).\n\n"
        card += "| result | value |\n| --- | --- |\n" + "".join(f"| {k} | {_fmt(v)} |\n" for k, v in rows)
    else:
        card += "\nNot evaluated yet (`pipeline eval EXPORT --train-shards ... --test-shards ...`).\n"
    if meta.get("command"):
        card += f"\n## How it was made\n\n```bash\n{meta['command']}\n```\n"
    return card


def _flatten(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix} / {k}" if prefix else str(k))
    else:
        yield prefix, tree


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------------------
# Atomic, world-readable writes


def _is_export_folder(path: Path) -> bool:
    """Only our files (and a temporary file a killed card rewrite left): safe to replace as a whole."""
    return path.is_dir() and all(p.name in _EXPORT_FILES or (p.name.startswith(".") and ".tmp" in p.name)
                                 for p in path.iterdir())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    _fsync(path.parent)


def _publish(staging: Path, out: Path) -> None:
    """Make the complete ``staging`` folder ``out``: files 0644 and fsynced, folder 0755, then renamed. An earlier
    ``out`` is moved aside first and deleted after, so a reader sees the old export, none, or the new one."""
    for f in staging.iterdir():
        os.chmod(f, 0o644)
        _fsync(f)
    os.chmod(staging, 0o755)
    _fsync(staging)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    _fsync(out.parent)
    if old is not None:
        shutil.rmtree(old)
