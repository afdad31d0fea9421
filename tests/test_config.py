"""GenerateConfig validation and TOML loading."""

import pytest

from tckr_engine.config import GenerateConfig, generate_config_from_toml
from tckr_engine.errors import TckrError


def test_defaults_validate():
    cfg = GenerateConfig().validate()
    assert cfg.model == "fmnist" and cfg.guidance == 2.0 and cfg.sampler == "dpm++"


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("num_images", 0, "num_images must be a positive integer"),
        ("num_images", -5, "num_images"),
        ("shard_size", 100_000, "shard_size must be at most"),
        ("batch_size", 1.5, "batch_size"),
        ("steps", True, "steps"),
        ("guidance", -1, "guidance"),
        ("seed", -1, "seed"),
        ("sampler", "plms", "sampler must be one of"),
        ("image_format", "gif", "image_format"),
        ("prompt_template", "a photo", "{name}"),
        ("device", "tpu", "device"),
    ],
)
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(TckrError, match=None) as e:
        GenerateConfig(**{field: value}).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_toml_loading_and_flag_precedence(tmp_path):
    f = tmp_path / "gen.toml"
    f.write_text('[generate]\nnum-images = 64\nsampler = "ddim"\nguidance = 3.0\n')
    cfg = generate_config_from_toml(f).merged({"sampler": "euler", "steps": None})
    assert (cfg.num_images, cfg.sampler, cfg.guidance, cfg.steps) == (64, "euler", 3.0, 20)


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[generate\n")
    with pytest.raises(TckrError, match="not valid TOML"):
        generate_config_from_toml(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[generate]\nnum_imgs = 3\n")
    with pytest.raises(
        TckrError, match=r"unknown key 'num_imgs' in .* \(did you mean num_images\?\); valid keys"
    ):
        generate_config_from_toml(unknown)
    with pytest.raises(TckrError, match="config file not found"):
        generate_config_from_toml(tmp_path / "missing.toml")
