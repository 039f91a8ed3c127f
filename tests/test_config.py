"""Typed configs: YAML round trips, strict errors naming key and file, dotted overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from mllm.config import ConfigError, from_dict, load_config, save_config, to_dict
from mllm.registry import UnknownNameError


@dataclass
class Lora:
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class Model:
    name: str
    lora: Lora = field(default_factory=Lora)
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_length: int | None = None
    extra: dict[str, int] = field(default_factory=dict)


def test_yaml_round_trip(tmp_path):
    cfg = Model(name="tiny", lora=Lora(r=4, targets=["o_proj"]), max_length=128, extra={"a": 1})
    save_config(cfg, tmp_path / "m.yaml")
    assert load_config(Model, tmp_path / "m.yaml") == cfg
    assert to_dict(cfg)["lora"] == {"r": 4, "alpha": 16.0, "targets": ["o_proj"]}


def test_dotted_overrides_are_parsed_as_yaml(tmp_path):
    (tmp_path / "m.yaml").write_text("name: tiny\n")
    cfg = load_config(Model, tmp_path / "m.yaml", ["lora.r=16", "lora.targets=[a, b]", "dtype=bfloat16", "lora.alpha=32"])
    assert cfg.lora == Lora(r=16, alpha=32.0, targets=["a", "b"]) and cfg.dtype == "bfloat16"


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("name: x\nlora: {rank: 4}\n", [], r"lora.rank in .*m.yaml: unknown key"),
        ("name: x\n1: y\nzz: 2\n", [], r"^1 in .*m.yaml: unknown key"),  # sorting int and str keys raised TypeError
        ("name: x\nlora: {r: four}\n", [], r"lora.r in .*m.yaml: expected int, got str"),
        ("name: x\nlora: {r: true}\n", [], r"lora.r .*expected int, got bool"),
        ("name: x\ndtype: fp8\n", [], r"dtype .*must be one of \['float32', 'bfloat16'\]"),
        ("lora: {r: 4}\n", [], r"name in .*m.yaml: required key is missing"),
        ("name: x\nlora: [1, 2]\n", [], r"lora .*expected a mapping"),
        ("name: x\nlora: {targets: [1]}\n", [], r"lora.targets\[0\] .*expected str"),
        ("name: x\n", ["lora.r"], r"key.path=value"),
        ("name: x\n", ["name.sub=1"], r"'name' is not a section"),
        ("- 1\n- 2\n", ["lora.r=4"], r"m.yaml: expected a mapping for Model, got list"),  # was a TypeError
        ("name: [unclosed\n", [], r"m.yaml:2:1: invalid YAML: while parsing a flow sequence"),
        ("name: x\n  lora: 2\n", [], r"m.yaml:2:7: invalid YAML: mapping values are not allowed here"),
    ],
)
def test_bad_configs_name_the_key_and_the_file(tmp_path, text, overrides, match):
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(Model, tmp_path / "m.yaml", overrides)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config(Model, tmp_path / "nope.yaml")


def test_post_init_validation_is_reported_as_config_error():
    from mllm.checkpoint import ModelConfig

    with pytest.raises(ConfigError, match="exactly one of 'base'"):
        from_dict(ModelConfig, {"tokenizer": "t"}, source="recipe.yaml")


def test_a_binary_file_is_a_config_error(tmp_path):
    # read_text's UnicodeDecodeError escaped as a traceback that named neither the file nor the problem
    (tmp_path / "m.yaml").write_bytes(b"\xff\xfe\x00n\x00a\x00m\x00e")
    with pytest.raises(ConfigError, match=r"m.yaml: cannot read config: not UTF-8 text \(byte 0\)"):
        load_config(Model, tmp_path / "m.yaml")


@pytest.mark.parametrize("text, error, match", [
    ("name: [patch\n", ConfigError, r"media_tokenizer.yaml:2:1: invalid YAML"),  # was yaml's ParserError
    ("- patch\n", ConfigError, r"name in .*media_tokenizer.yaml: expected the media tokenizer's registry name"),
    ("config: {}\n", ConfigError, r"name in .*media_tokenizer.yaml: expected"),  # was KeyError: 'name'
    ("name: nope\n", UnknownNameError, r"media_tokenizer.yaml: unknown media tokenizer 'nope'"),
])
def test_a_saved_modules_broken_config_file_is_named(tmp_path, text, error, match):
    from mllm.tokenizers import build_media_tokenizer, load_media_tokenizer

    saved = build_media_tokenizer("patch", {"image_size": 16, "patch_size": 8}).save_pretrained(tmp_path / "tok")
    (saved / "media_tokenizer.yaml").write_text(text)
    with pytest.raises(error, match=match):
        load_media_tokenizer(saved)


def test_a_saved_modules_broken_weights_are_named(tmp_path):
    # load_file's SafetensorError and load_state_dict's RuntimeError named neither the file nor the directory
    from mllm.heads import build_head, load_head
    from mllm.module import WeightsError

    options = {"hidden_size": 8, "feature_dim": 4, "width": 8, "depth": 1}
    saved = build_head("regression", options).save_pretrained(tmp_path / "head")
    wider = build_head("regression", options | {"width": 16}).save_pretrained(tmp_path / "wider")
    (saved / "model.safetensors").replace(tmp_path / "small.safetensors")
    (wider / "model.safetensors").replace(saved / "model.safetensors")
    with pytest.raises(WeightsError, match=r"head/model.safetensors: .*size mismatch"):
        load_head(saved)
    (saved / "model.safetensors").write_bytes((tmp_path / "small.safetensors").read_bytes()[:40])
    with pytest.raises(WeightsError, match=r"head/model.safetensors: "):
        load_head(saved)
    (saved / "model.safetensors").unlink()  # loaded as a fresh, untrained head, without a word
    with pytest.raises(WeightsError, match=r"head: no model.safetensors for the 'regression' head's weights"):
        load_head(saved)


def test_save_config_flushes_before_the_rename(tmp_path, monkeypatch):
    # the rename published text still in the page cache: a crash could leave an empty config in its place
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or replace(a, b))
    save_config(Lora(), tmp_path / "lora.yaml")
    assert events == ["fsync", "replace"] and load_config(Lora, tmp_path / "lora.yaml") == Lora()
