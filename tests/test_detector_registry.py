"""Detector families as packages: the config finds a family's section through the registry (issue #15 item 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from tilead.trainer.config import ConfigError, RunConfig, parse_config
from tilead.trainer.detectors import sections
from tilead.trainer.detectors.base import families
from tilead.trainer.detectors.sections import DetectorSection, model_sections, register_section, section_class

PACKAGE = Path(sections.__file__).parent


def _config(model: dict[str, object]) -> dict[str, object]:
    return {"data": {"format": "mvtec", "root": "data"}, "grid": {"tile_size": 32}, "model": model}


def test_every_family_is_one_package_with_config_model_and_detector() -> None:
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["padim", "patchcore", "stfpm"]
    for name in packages:
        assert {"config.py", "model.py", "detector.py"} <= {f.name for f in (PACKAGE / name).iterdir()}
    assert sorted(model_sections()) == packages
    assert families() == packages  # every section has its detector and back


def test_a_new_family_needs_no_edit_of_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """A section registered at run time is what a ``model.family`` of that name validates against."""

    class ToyConfig(DetectorSection):
        family: Literal["toy"] = "toy"
        radius: int = Field(default=3, ge=1)

    monkeypatch.setitem(sections._SECTIONS, "toy", ToyConfig)  # removed again after the test
    assert register_section(ToyConfig) is ToyConfig  # registering the same class again is allowed
    cfg = parse_config(_config({"family": "toy", "radius": 5}), base_dir=Path("/tmp"))
    assert isinstance(cfg.model, ToyConfig)
    assert cfg.model.radius == 5
    assert cfg.to_dict()["model"] == {
        "family": "toy",
        "backbone": {
            "name": "efficientnet_lite0",
            "weights": "default",
            "layers": ["blocks.1", "blocks.2", "blocks.3"],
        },
        "feature_stride": 8,
        "blur_sigma": 0.0,
        "thumbnail": None,
        "radius": 5,
    }
    assert RunConfig.model_validate(cfg.to_dict()) == cfg  # a saved config reads back the same
    with pytest.raises(ConfigError, match=r"model\.radius: Input should be greater than or equal to 1"):
        parse_config(_config({"family": "toy", "radius": 0}), base_dir=Path("/tmp"))
    with pytest.raises(ConfigError, match=r"model\.n_features: unknown key; allowed keys here: family, backbone"):
        parse_config(_config({"family": "toy", "n_features": 4}), base_dir=Path("/tmp"))
    with pytest.raises(ConfigError, match=r"image_score 'detector': model\.family 'toy' has no image score"):
        parse_config({**_config({"family": "toy"}), "postprocess": {"image_score": "detector"}}, base_dir=Path("/"))


def test_a_second_section_for_a_family_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class OtherPadim(DetectorSection):
        family: Literal["padim"] = "padim"

    monkeypatch.setitem(sections._SECTIONS, "padim", section_class("padim"))
    with pytest.raises(ValueError, match="registered twice"):
        register_section(OtherPadim)


def test_a_section_without_a_family_default_is_refused() -> None:
    class Nameless(DetectorSection):
        pass

    with pytest.raises(ValueError, match="needs a 'family' field with a non-empty default"):
        register_section(Nameless)


@pytest.mark.parametrize("family", ["nope", 3, None])
def test_an_unknown_family_lists_the_known_ones(family: object) -> None:
    with pytest.raises(ConfigError, match="does not match any of the expected tags: 'padim', 'patchcore', 'stfpm'"):
        parse_config(_config({"family": family}), base_dir=Path("/tmp"))
    with pytest.raises(KeyError, match="known: padim, patchcore, stfpm"):
        section_class(str(family))


def test_a_model_section_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model: Input should be a valid dictionary or instance of DetectorSection"):
        parse_config(_config(3), base_dir=Path("/tmp"))  # type: ignore[arg-type]
