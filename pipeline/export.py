"""Export the encoder to ``model.safetensors`` + ``config.json`` with timm keys, and load it back into timm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import Config, ModelConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def encoder_state(method_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a method state dict, with the ``encoder.`` prefix removed (timm keys)."""
    prefix = "encoder."
    return {k[len(prefix):]: v.detach().to("cpu").contiguous() for k, v in method_state.items() if k.startswith(prefix)}


def export_encoder(method_state: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path,
                   extra: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = encoder_state(method_state)
    if not weights:
        raise ValueError("the method state holds no encoder.* entries to export")
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, str(tmp),
              metadata={"format": "pt", "architecture": cfg.model.name})
    tmp.replace(out / WEIGHTS)
    meta = {
        "architecture": cfg.model.name,
        "timm_kwargs": cfg.model.timm_kwargs(),
        "method": cfg.method.name,
        "image_size": cfg.model.img_size,
        "mean": list(cfg.augment.mean),
        "std": list(cfg.augment.std),
        "load": f"timm.create_model({cfg.model.name!r}, pretrained=False, **timm_kwargs)"
                f".load_state_dict(safetensors.torch.load_file('model.safetensors'), strict=True)",
        **(extra or {}),
    }
    (out / CONFIG).write_text(json.dumps(meta, indent=1))
    return out / WEIGHTS


def load_exported(path: str | Path) -> torch.nn.Module:
    """Build the timm model named in ``config.json`` and load the weights strictly."""
    import timm

    path = Path(path)
    meta = json.loads((path / CONFIG).read_text())
    model = timm.create_model(meta["architecture"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return model.eval()


def model_config_of(path: str | Path) -> ModelConfig:
    meta = json.loads((Path(path) / CONFIG).read_text())
    kw = meta["timm_kwargs"]
    return ModelConfig(name=meta["architecture"], img_size=kw.get("img_size", 224), patch_size=kw.get("patch_size"),
                       embed_dim=kw.get("embed_dim"), depth=kw.get("depth"), num_heads=kw.get("num_heads"),
                       global_pool=kw.get("global_pool"), dynamic_img_size=kw.get("dynamic_img_size", False),
                       reg_tokens=kw.get("reg_tokens", 0))
