"""Tests for ddpm_core.config: presets, overrides, validation messages and flattening."""

import pytest
from pydantic import ValidationError

from ddpm_core.config import PRESETS, PipelineConfig, flatten, make_config


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
def test_preset_builds_valid_config(name):
    config = make_config(name)

    assert isinstance(config, PipelineConfig)
    assert config.preset == name
    assert config.train.steps % config.train.steps_per_dispatch == 0
    assert set(config.model.attention_resolutions) <= set(config.model.resolutions())


def test_preset_names():
    assert sorted(PRESETS) == ["cpu", "gpu", "smoke"]


def test_smoke_preset_values():
    config = make_config("smoke")

    assert config.model.base_channels == 8
    assert config.model.channel_mults == (1, 2)
    assert config.model.resolutions() == (28, 14)
    assert config.diffusion.num_timesteps == 20
    assert config.train.batch_size == 8
    # Fields the preset leaves out keep their defaults.
    assert config.model.num_res_blocks == 1
    assert config.diffusion.prediction_type == "eps"


def test_resolutions_halve_per_level():
    config = make_config("cpu")

    assert config.model.resolutions() == (28, 14, 7)


def test_dotted_override_sets_field():
    config = make_config("smoke", {"train.steps": 10, "model.base_channels": 16})

    assert config.train.steps == 10
    assert config.model.base_channels == 16
    # Sibling fields from the preset survive the override.
    assert config.train.batch_size == 8
    assert config.model.num_groups == 4


def test_nested_override_sets_field():
    config = make_config("smoke", {"train": {"steps": 10}, "diffusion": {"schedule": "cosine"}})

    assert config.train.steps == 10
    assert config.diffusion.schedule == "cosine"
    assert config.train.batch_size == 8
    assert config.diffusion.num_timesteps == 20


def test_dotted_and_nested_overrides_agree():
    dotted = make_config("cpu", {"train.learning_rate": 5e-4, "sample.num_samples": 16})
    nested = make_config("cpu", {"train": {"learning_rate": 5e-4}, "sample": {"num_samples": 16}})

    assert dotted == nested


def test_config_is_frozen():
    config = make_config("smoke")

    with pytest.raises(ValidationError, match="frozen"):
        config.train.steps = 3


def test_steps_zero_rejected():
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"train.steps": 0})

    message = str(raised.value)
    assert "train.steps" in message
    assert "greater than or equal to 1" in message


def test_learning_rate_zero_rejected():
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"train": {"learning_rate": 0.0}})

    message = str(raised.value)
    assert "train.learning_rate" in message
    assert "greater than 0" in message


def test_num_groups_must_divide_channels():
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"model.num_groups": 3})

    message = str(raised.value)
    assert "model" in message
    assert "num_groups=3" in message
    assert "must divide every channel count" in message


def test_num_heads_must_divide_channels():
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"model.num_heads": 3})

    message = str(raised.value)
    assert "num_heads=3" in message
    assert "must divide every channel count" in message


def test_channel_mult_out_of_range_rejected():
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"model.channel_mults": (1, 9)})

    assert "channel_mults entries must be in [1, 8]" in str(raised.value)


def test_unknown_schedule_rejected():
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"diffusion.schedule": "quadratic"})

    message = str(raised.value)
    assert "diffusion.schedule" in message
    assert "'linear' or 'cosine'" in message
    assert "quadratic" in message


def test_unknown_field_rejected():
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"train.stepz": 3})

    message = str(raised.value)
    assert "train.stepz" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_section_rejected():
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"trainer": {"steps": 3}})

    assert "trainer" in str(raised.value)


def test_unknown_preset_rejected():
    with pytest.raises(ValueError) as raised:
        make_config("tiny")

    message = str(raised.value)
    assert "tiny" in message
    assert "['cpu', 'gpu', 'smoke']" in message


def test_attention_resolution_must_be_a_level():
    # The smoke model has two levels, 28 and 14 pixels, so 7 is not among them.
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"model.attention_resolutions": (7,)})

    message = str(raised.value)
    assert "attention_resolutions" in message
    assert "(28, 14)" in message


def test_attention_at_full_resolution_allowed():
    config = make_config("smoke", {"model.attention_resolutions": (28,)})

    assert config.model.attention_resolutions == (28,)


def test_steps_must_be_multiple_of_dispatch():
    with pytest.raises(ValueError) as raised:
        make_config("smoke", {"train.steps": 9})

    message = str(raised.value)
    assert "steps=9" in message
    assert "steps_per_dispatch=2" in message


def test_flat_uses_dotted_keys():
    flat = make_config("smoke").flat()

    assert flat["preset"] == "smoke"
    assert flat["train.batch_size"] == 8
    assert flat["diffusion.schedule"] == "linear"
    assert flat["sample.frame_every"] == 5
    assert all(isinstance(key, str) for key in flat)
    assert not any(isinstance(value, dict) for value in flat.values())


def test_flat_joins_tuples_with_commas():
    flat = make_config("gpu").flat()

    assert flat["model.channel_mults"] == "1,2,2"
    assert flat["model.attention_resolutions"] == "14,7"


def test_flat_covers_every_field():
    config = make_config("smoke")
    flat = config.flat()
    expected = 1 + sum(
        len(type(getattr(config, section)).model_fields)
        for section in ("model", "diffusion", "train", "sample", "eval")
    )

    assert len(flat) == expected


def test_flatten_nested_prefixes():
    flat = flatten({"a": {"b": {"c": 1}, "d": (1, 2)}, "e": []})

    assert flat == {"a.b.c": 1, "a.d": "1,2", "e": ""}
