"""Exports in timm's own folder layout: ``timm.create_model('local-dir:EXPORT', pretrained=True)`` loads them, the
files are those ``timm.models.push_to_hf_hub`` uploads, they are written world-readable and whole, and the model
card follows what evaluation returns. (A real run's export: tests/test_train.py.)"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import load_config
from pipeline.export import (
    CARD,
    CONFIG,
    META,
    WEIGHTS,
    ExportError,
    export_encoder,
    load_exported,
    model_config_of,
    read_export_meta,
    write_card,
)
from pipeline.models import build_encoder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "run.command=pipeline launch tiny.yaml"]


@pytest.fixture
def exported(tmp_path):
    """A tiny encoder with random weights, exported as the trainer does (no training needed for the format)."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", TINY)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model).eval()
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    out = tmp_path / "run" / "export"
    export_encoder(state, cfg, out, extra={"steps": 10, "images_seen": 640, "world_size": 2})
    return cfg, encoder, out


def test_timm_loads_the_folder_in_one_line(exported):
    cfg, encoder, out = exported
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.num_classes == 0 and model.num_features == encoder.num_features
    assert model.pretrained_cfg["input_size"] == (3, cfg.model.img_size, cfg.model.img_size)
    assert tuple(model.pretrained_cfg["mean"]) == tuple(cfg.augment.mean)
    assert tuple(model.pretrained_cfg["std"]) == tuple(cfg.augment.std)
    x = torch.randn(3, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        assert torch.equal(model(x), encoder(x))
        assert torch.equal(load_exported(out)(x), model(x))  # our own loader builds the same model
    # timm's data config reproduces the loaders' eval transform: shorter side to img_size, centre crop, normalise
    data = timm.data.resolve_model_data_config(model)
    assert data["crop_pct"] == 1.0 and data["interpolation"] == "bilinear"
    assert model_config_of(out) == cfg.model.__class__(**{**cfg.model.__dict__, "drop_path_rate": 0.0,
                                                          "grad_checkpointing": False})


def test_files_are_what_push_to_hf_hub_uploads(exported, tmp_path):
    """push_to_hf_hub = save_for_hf (config.json + model.safetensors) + generate_readme (README.md), uploaded with
    huggingface_hub; saving the loaded model again with timm's own code gives the same files."""
    from timm.models._hub import save_for_hf

    _, _, out = exported
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    again = tmp_path / "again"
    save_for_hf(model, str(again), safe_serialization=True)
    assert json.loads((again / CONFIG).read_text()) == json.loads((out / CONFIG).read_text())
    a, b = load_file(again / WEIGHTS), load_file(out / WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((out / CONFIG).read_text())
    assert {"architecture", "num_classes", "num_features", "model_args", "pretrained_cfg"} <= set(config)
    assert "tag" not in config["pretrained_cfg"] or config["pretrained_cfg"]["tag"] == "simclr"  # not timm's preset
    assert "license" not in config["pretrained_cfg"]
    card = (out / CARD).read_text()
    front = card.split("---\n")[1]
    assert "library_name: timm" in front and "pipeline_tag: image-feature-extraction" in front


def test_written_world_readable_and_whole(exported, tmp_path):
    cfg, encoder, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([CARD, CONFIG, META, WEIGHTS])
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert not list(out.parent.glob("export.*"))  # no staging folder left behind

    # a second export replaces the first as a whole; a folder holding anything else is never replaced
    state = {f"encoder.{k}": torch.zeros_like(v) for k, v in encoder.state_dict().items()}
    export_encoder(state, cfg, out)
    assert all(not v.any() for v in load_file(out / WEIGHTS).values())
    assert "steps" not in read_export_meta(out)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"...")
    with pytest.raises(FileExistsError, match="not an export folder"):
        export_encoder(state, cfg, other)
    assert (other / "cat.jpg").exists()


def test_model_card_states_the_run_and_follows_the_results(exported):
    _, _, out = exported
    card = (out / CARD).read_text()
    for fact in ("simclr", "data/fashion-mnist/train", "**Steps:** 10", "**Images seen:** 640",
                 "pipeline launch tiny.yaml", f"timm.create_model('local-dir:{out}', pretrained=True)"):
        assert fact in card, fact
    assert "Not evaluated yet" in card
    # nested results of any shape (kNN per k, zero-shot, ...) are rendered, not only today's keys
    results = {"knn": {"pretrained": {"k=10": 0.8125, "k=20": 0.75}, "random_init": {"k=20": 0.5}},
               "linear_probe": {"pretrained": 0.875}, "zero_shot": 0.25, "num_train": 2048}
    write_card(out, results)
    card = (out / CARD).read_text()
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", card, re.MULTILINE))
    assert rows["knn / pretrained / k=10"] == "0.8125" and rows["knn / random_init / k=20"] == "0.5000"
    assert rows["linear_probe / pretrained"] == "0.8750" and rows["zero_shot"] == "0.2500"
    assert rows["num_train"] == "2048"
    assert read_export_meta(out)["results"] == results
    assert stat.S_IMODE((out / CARD).stat().st_mode) == 0o644
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_exports_written_before_the_timm_layout_still_load(tmp_path):
    """Layout 1: our own config.json (architecture, timm_kwargs, ...) beside the same weights."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", TINY)
    encoder = build_encoder(cfg.model).eval()
    old = tmp_path / "old"
    old.mkdir()
    save_file(encoder.state_dict(), str(old / WEIGHTS))
    (old / CONFIG).write_text(json.dumps({
        "architecture": cfg.model.name, "timm_kwargs": cfg.model.timm_kwargs(), "method": "simclr",
        "image_size": cfg.model.img_size, "mean": list(cfg.augment.mean), "std": list(cfg.augment.std)}))
    x = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        assert torch.equal(load_exported(old)(x), encoder(x))
    assert model_config_of(old).embed_dim == 32
    with pytest.raises(ExportError, match="not an export folder"):
        read_export_meta(tmp_path)


def test_readme_load_snippet_runs(exported, monkeypatch):
    """The README's "Load an export into timm" block, run as shown against a real export folder."""
    _, encoder, out = exported
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Load an export into timm"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "local-dir:runs/my_run/export" in code
    monkeypatch.chdir(out.parent.parent)
    (out.parent.parent / "runs").mkdir()
    out.parent.rename(out.parent.parent / "runs" / "my_run")
    scope: dict = {}
    exec(code, scope)  # noqa: S102 (the README's own code)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(scope["model"].eval()(x), encoder(x))
