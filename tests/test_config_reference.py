"""The reference configs list every key the config schema accepts (issue #19 item 5), so they cannot drift.

``configs/padim_bottle.yaml`` is the reference: every key of every section (the folder layout's data keys
included) appears in it, active or as a commented ``# key: default`` line. The model section's keys of
each detector family appear in that family's ``configs/<family>_bottle.yaml``.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from tilead.trainer.config import RunConfig
from tilead.trainer.detectors.sections import model_sections

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REFERENCE = CONFIGS / "padim_bottle.yaml"
_COMMENTED_KEY = re.compile(r"(?m)^(\s*)# ([a-z_]+:)")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys a section accepts, nested sections included (the detector-specific ``model`` left out)."""
    keys = []
    for name, field in model.model_fields.items():
        if model is RunConfig and name == "model":
            continue
        keys.append(prefix + name)
        sub = _section_model(field.annotation)
        if sub is not None:
            keys += schema_keys(sub, f"{prefix}{name}.")
    return keys


def _dotted(data: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _dotted(value, f"{prefix}{key}.")
    return out


def listed_keys(text: str) -> set[str]:
    """Keys of a YAML config, the commented ``# key: value`` lines counted as if uncommented."""
    data = yaml.safe_load(_COMMENTED_KEY.sub(r"\1\2", text))
    assert isinstance(data, dict)
    return _dotted(data)


def test_listed_keys_counts_commented_keys_and_ignores_prose() -> None:
    text = "# A heading: prose\na: 1\nb:\n  c: 2\n  # d: 3     # comment\n  #   e: not a key line\n"
    assert listed_keys(text) == {"a", "b", "b.c", "b.d"}


def test_schema_keys_walks_nested_sections() -> None:
    keys = schema_keys(RunConfig)
    assert {"data.mask_template", "data.good_dir", "grid.tile_size", "postprocess.seam", "eval.resolution"} <= set(keys)
    assert not any(k.startswith("model") for k in keys)


def test_reference_config_lists_every_key_of_the_schema() -> None:
    listed = listed_keys(REFERENCE.read_text())
    missing = [key for key in schema_keys(RunConfig) if key not in listed]
    assert not missing, f"{REFERENCE.name} lacks these keys (add them, commented with their default): {missing}"


@pytest.mark.parametrize("family", sorted(model_sections()))
def test_each_family_config_lists_every_model_key(family: str) -> None:
    path = CONFIGS / f"{family}_bottle.yaml"
    listed = listed_keys(path.read_text())
    missing = [f"model.{k}" for k in schema_keys(model_sections()[family]) if f"model.{k}" not in listed]
    assert not missing, f"{path.name} lacks these keys (add them, commented with their default): {missing}"


def test_reference_config_with_its_commented_keys_is_still_a_valid_mvtec_config() -> None:
    # The commented keys that apply to the MVTec layout, uncommented, must validate (their values are defaults).
    text = REFERENCE.read_text()
    folder_only = ("good_dir", "test_good_dir", "defect_dirs", "mask_dir", "mask_suffix", "mask_template")
    from tilead.trainer.config import parse_config

    data = yaml.safe_load(_COMMENTED_KEY.sub(r"\1\2", text))
    for key in folder_only:
        data["data"].pop(key)
    # An optional section off by default (null) is listed with an example value, which must validate.
    example = data["model"].pop("thumbnail")
    assert parse_config({**data, "model": {**data["model"], "thumbnail": example}}, base_dir=CONFIGS)

    uncommented = parse_config(data, base_dir=CONFIGS)
    as_written = parse_config(yaml.safe_load(text), base_dir=CONFIGS)
    assert uncommented == as_written  # every commented value is the default
