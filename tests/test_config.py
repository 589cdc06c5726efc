import pytest
import yaml

from fdpipe.config import ConfigError, load_config, validate_config

MINIMAL = {"spaces": {"pixels": {"family": "pixels"}}}


def test_shipped_configs_are_valid():
    for name in ("config/config.yaml", "config/smoke.yaml"):
        config = load_config(name)
        assert config["evaluation"]["fdrk_spaces"]


def test_defaults_filled():
    config = validate_config(MINIMAL)
    assert config["seed"] == 0
    assert config["data"]["resolution"] == 32
    assert config["generator"]["base_steps"] == [1, 32]


def test_run_defaults_merged():
    config = validate_config({**MINIMAL, "finetune": {
        "defaults": {"steps": 7}, "runs": {"r": {"spaces": ["pixels"], "lr": 0.5}}}})
    run = config["finetune"]["runs"]["r"]
    assert run["steps"] == 7
    assert run["lr"] == 0.5
    assert run["beta"] == 0.999


def test_misspelt_key_names_key_and_fix():
    with pytest.raises(ConfigError) as err:
        validate_config({**MINIMAL, "evaluation": {"num_sampels": 10}})
    message = str(err.value)
    assert "'num_sampels'" in message
    assert "did you mean 'num_samples'" in message
    assert "evaluation" in message


def test_out_of_range_and_enum_named():
    with pytest.raises(ConfigError) as err:
        validate_config({**MINIMAL, "finetune": {"runs": {"r": {
            "spaces": ["pixels"], "beta": 1.5, "method": "fifo"}}}})
    message = str(err.value)
    assert "finetune.runs.r.beta = 1.5" in message
    assert "'fifo'" in message
    assert "'queue'" in message


def test_unknown_space_reference_named():
    with pytest.raises(ConfigError, match="finetune.runs.r names space 'clasifier'"):
        validate_config({**MINIMAL, "finetune": {"runs": {"r": {"spaces": ["clasifier"]}}}})


def test_unknown_family_named():
    with pytest.raises(ConfigError, match="'dino'"):
        validate_config({"spaces": {"x": {"family": "dino"}}})


def test_config_file_typo(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "generater": {}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "did you mean 'generator'" in str(err.value)
