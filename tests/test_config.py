"""Config files load into validated dataclasses; bad configs raise ConfigError naming file, model, field."""

from __future__ import annotations

import pytest
from tta_engine.config import coerce_configs, get_config, load_model_configs, model_config_from_dict
from tta_engine.errors import ConfigError, ModelNotAvailableError, UnknownModelError
from tta_engine.sources import resolve_source

GOOD = """
[models.m1]
model_type = "causal_lm"
quantization = "8bit"
source = { kind = "local", path = "/tmp/nowhere" }
"""


def write(tmp_path, text):
    p = tmp_path / "models.toml"
    p.write_text(text)
    return p


def test_packaged_configs_have_seed_models_and_defaults():
    cfgs = load_model_configs()
    for name in ("phi-4-mini-instruct", "gemma-3-1b-it", "all-MiniLM-L6-v2", "smollm2-135m-instruct",
                 "all-minilm-l6-v2"):
        assert name in cfgs
    phi = cfgs["phi-4-mini-instruct"]
    assert phi.quantization == "4bit" and phi.precision == "int4" and phi.max_tokens == 512
    assert phi.task_mapping["tool_selection"].suitable is True
    assert cfgs["gemma-3-1b-it"].task_mapping["tool_selection"].suitable is False
    assert cfgs["all-MiniLM-L6-v2"].embedding_dimension == 384 and cfgs["all-MiniLM-L6-v2"].quantization is None
    smol = cfgs["smollm2-135m-instruct"]
    assert smol.source.kind == "package" and smol.source.is_gguf
    assert smol.task_mapping["narrative_generation"].speed_score == 1.0


def test_quantization_maps_to_precision(tmp_path):
    cfg = load_model_configs(write(tmp_path, GOOD))["m1"]
    assert cfg.precision == "int8"


@pytest.mark.parametrize("line, field", [
    ('colour = "red"', "colour"),
    ('quantization = "3bit"', "quantization"),
    ('max_tokens = "many"', "max_tokens"),
    ("temperature = -1.0", "temperature"),
    ("top_p = 1.5", "top_p"),
    ("supports_streaming = 1", "supports_streaming"),
])
def test_bad_field_names_file_model_and_field(tmp_path, line, field):
    body = GOOD.replace('quantization = "8bit"\n', "")
    p = write(tmp_path, body.replace("[models.m1]\n", f"[models.m1]\n{line}\n"))
    with pytest.raises(ConfigError) as err:
        load_model_configs(p)
    msg = str(err.value)
    assert str(p) in msg and "'m1'" in msg and field in msg


def test_missing_required_field(tmp_path):
    p = write(tmp_path, '[models.m2]\nmodel_type = "causal_lm"\n')
    with pytest.raises(ConfigError, match=r"'m2'.*'source'.*missing"):
        load_model_configs(p)


def test_embedding_needs_dimension():
    with pytest.raises(ConfigError, match="embedding_dimension"):
        model_config_from_dict("e", {"model_type": "embedding", "source": {"kind": "local", "path": "x"}})


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_model_configs(write(tmp_path, "[models.x\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_model_configs(tmp_path / "nope.toml")


def test_unknown_fallback_is_rejected(tmp_path):
    p = write(tmp_path, GOOD + 'fallbacks = ["ghost"]\n')
    with pytest.raises(ConfigError, match="ghost"):
        load_model_configs(p)


def test_unknown_model_error_lists_known_names():
    cfgs = load_model_configs()
    with pytest.raises(UnknownModelError) as err:
        get_config(cfgs, "gpt-17")
    assert "gpt-17" in str(err.value) and "smollm2-135m-instruct" in str(err.value)
    assert isinstance(err.value, KeyError)


def test_seed_dicts_are_accepted():
    seed = {
        "phi-4-mini-instruct": {
            "model_id": "microsoft/phi-4-mini-instruct", "tokenizer_id": "microsoft/phi-4-mini-instruct",
            "model_type": "causal_lm", "quantization": "4bit", "max_tokens": 512, "temperature": 0.7,
            "supports_streaming": True,
            "task_mapping": {"narrative_generation": True, "tool_selection": True},
        },
        "all-MiniLM-L6-v2": {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "model_type": "embedding",
                             "quantization": None, "embedding_dimension": 384},
    }
    cfgs = coerce_configs(seed)
    assert cfgs["phi-4-mini-instruct"].source.kind == "hub"
    assert cfgs["phi-4-mini-instruct"].source.repo_id == "microsoft/phi-4-mini-instruct"
    assert cfgs["all-MiniLM-L6-v2"].quantization is None


def test_hub_source_offline_says_how_to_provide(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = model_config_from_dict("h", {"model_type": "causal_lm",
                                       "source": {"kind": "hub", "repo_id": "nobody/not-a-model",
                                                  "cache_dir": str(tmp_path)}})
    with pytest.raises(ModelNotAvailableError, match="not available locally.*huggingface-cli download"):
        resolve_source(cfg)


def test_missing_package_source_gives_install_hint():
    cfg = model_config_from_dict("p", {"model_type": "causal_lm",
                                       "source": {"kind": "package", "package": "no_such_pkg_xyz",
                                                  "file": "m.gguf", "install_hint": "pip install no-such-pkg"}})
    with pytest.raises(ModelNotAvailableError, match="pip install no-such-pkg"):
        resolve_source(cfg)


def test_validation_thresholds_parse_and_bad_ones_name_the_field():
    from tta_engine.errors import ConfigError

    src = {"kind": "local", "path": "x"}
    cfg = model_config_from_dict("v", {"model_type": "causal_lm", "source": src,
                                       "validation": {"int4": {"min_top1": 0.5, "max_kl": 1}}})
    assert dict(cfg.validation["int4"]) == {"min_top1": 0.5, "max_kl": 1.0}
    for bad, field in [({"int3": {"min_top1": 0.5}}, "validation.int3"),
                       ({"int4": {"min_cosine": 0.9}}, "validation.int4.min_cosine"),
                       ({"int4": {"max_kl": "low"}}, "validation.int4.max_kl"),
                       ({"int4": 0.5}, "validation.int4")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            model_config_from_dict("v", {"model_type": "causal_lm", "source": src, "validation": bad})
