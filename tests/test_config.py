import pytest

from pipeline.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config


def test_preset_and_overrides_merge_in_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 0.5\nloader:\n  batch_size: 16\n")
    cfg = load_config(preset, ["optim.lr=1e-3", "augment.crop_scale=[0.2, 0.9]", "method=simclr"])
    assert cfg.optim.lr == pytest.approx(1e-3)  # CLI beats preset; "1e-3" (a YAML string) becomes a float
    assert cfg.loader.batch_size == 16  # preset beats default
    assert cfg.augment.crop_scale == (0.2, 0.9)
    assert cfg.model.name == Config().model.name  # default kept


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.learning_rate=0.1"])
    msg = str(err.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "weight_decay" in msg


def test_unknown_section_names_valid_sections(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="optimizer.*valid keys.*optim"):
        load_config(preset)


@pytest.mark.parametrize("override, needle", [
    ("loader.batch_size=big", "loader.batch_size must be an integer"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("metrics.tensorboard=maybe", "metrics.tensorboard must be true or false"),
    ("augment.crop_scale=[0.2]", "augment.crop_scale must have 2 items"),
    ("engine.name=horovod", "engine.name='horovod' is not one of"),
    ("augment.crop_scale=[0.9, 0.2]", "crop_scale"),
    ("optim", "key.sub=value"),
    ("train.stop_at_step=-1", "train.stop_at_step must be >= 0"),
])
def test_ill_typed_values_are_clear_errors(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_missing_preset_is_clear():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["launcher.slurm.additional_parameters={reservation: x}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_section_shorthand_sets_name():
    assert load_config(None, ["launcher=slurm"]).launcher.name == "slurm"
    assert load_config(None, ["engine=ddp"]).engine.name == "ddp"
