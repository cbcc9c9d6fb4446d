"""The folder layout's ``mask_template`` (issue #19 item 5): parser properties, config checks, discovery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tilead.trainer.config import ConfigError, parse_config
from tilead.trainer.data import DataConfig, DatasetError, discover
from tilead.trainer.mask_paths import FIELDS, MaskTemplate

ROOT = Path("/data/part")
IMAGE = ROOT / "scratch" / "deep" / "007.jpg"
VALUES = {
    "root": str(ROOT),
    "defect_dir": "scratch/deep",
    "defect": "deep",
    "stem": "007",
    "name": "007.jpg",
    "ext": "jpg",
}

literals = st.text(alphabet="abcxyz_-./0123456789", max_size=6)
fields = st.sampled_from(sorted(FIELDS))


@st.composite
def templates(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    """A valid template, the path it gives for IMAGE, and its fields in order of first use."""
    pieces = draw(st.lists(st.tuples(literals, fields), min_size=0, max_size=5))
    pieces.append((draw(literals), draw(st.sampled_from(["stem", "name"]))))
    pieces = draw(st.permutations(pieces))
    tail = draw(literals)
    text = "".join(f"{lit}{{{field}}}" for lit, field in pieces) + tail
    expected = "".join(lit + VALUES[field] for lit, field in pieces) + tail
    used = list(dict.fromkeys(field for _, field in pieces))
    return text, expected, used


@given(case=templates())
def test_valid_templates_parse_and_fill_in_every_placeholder(case: tuple[str, str, list[str]]) -> None:
    text, expected, used = case
    template = MaskTemplate.parse(text)
    assert template.text == text
    assert list(template.fields) == used
    assert template.path(ROOT, "scratch/deep", IMAGE) == ROOT / expected


@given(name=st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(lambda n: n not in FIELDS))
def test_unknown_placeholders_are_named_with_the_allowed_ones(name: str) -> None:
    with pytest.raises(ValueError, match=f"unknown placeholder {{{name}}}; use one of {{root}}, {{defect_dir}}"):
        MaskTemplate.parse(f"masks/{{{name}}}/{{stem}}.png")


@given(text=st.text(max_size=40))
def test_any_text_parses_or_raises_value_error_and_parsed_ones_fill_in(text: str) -> None:
    try:
        template = MaskTemplate.parse(text)
    except ValueError as err:
        message = str(err)
        assert message  # every refusal says why
        return
    assert "stem" in template.fields or "name" in template.fields
    assert isinstance(template.path(ROOT, "scratch/deep", IMAGE), Path)


@given(literal=literals)
def test_doubled_braces_are_literal_braces(literal: str) -> None:
    template = MaskTemplate.parse(f"{{{{{literal}}}}}/{{stem}}.png")
    assert template.fields == ("stem",)
    assert template.path(ROOT, "d", IMAGE) == ROOT / f"{{{literal}}}/007.png"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a mask path template such as"),
        ("   ", "expected a mask path template such as"),
        ("masks/all.png", "names no image, so every image would share one mask"),
        ("masks/{defect}.png", "names no image"),
        ("masks/{stem", "expected '}' before end of string"),
        ("masks/stem}.png", "Single '}' encountered"),
        ("masks/{}.png", r"positional placeholder \{\}"),
        ("masks/{0}.png", r"positional placeholder \{0\}"),
        ("masks/{stem:>5}.png", r"\{stem:>5\} has a conversion or format spec; write \{stem\}"),
        ("masks/{stem!r}.png", r"\{stem!r\} has a conversion or format spec"),
        ("masks/{stem.upper}.png", r"\{stem.upper\} accesses an attribute or index"),
        ("masks/{stem[0]}.png", r"\{stem\[0\]\} accesses an attribute or index"),
        ("masks/{Stem}.png", r"unknown placeholder \{Stem\}"),
    ],
)
def test_bad_templates_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskTemplate.parse(text)


def test_absolute_and_relative_templates() -> None:
    assert MaskTemplate.parse("/elsewhere/{defect}/{name}").path(ROOT, "scratch/deep", IMAGE) == Path(
        "/elsewhere/deep/007.jpg"
    )
    assert MaskTemplate.parse("gt/{defect_dir}/{stem}.{ext}.png").path(ROOT, "scratch/deep/", IMAGE) == (
        ROOT / "gt/scratch/deep/007.jpg.png"
    )


# -- in the config --------------------------------------------------------------------------------------


def _config(tmp_path: Path, **data: Any) -> Any:
    raw = {"data": {"format": "folder", "root": str(tmp_path), **data}, "grid": {"tile_size": 32}}
    return parse_config(raw, base_dir=tmp_path, source="cfg.yaml")


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.mask_template.*unknown placeholder \{type\}"):
        _config(tmp_path, defect_dirs=["scratch"], mask_template="m/{type}/{stem}.png")
    with pytest.raises(ConfigError, match="mask_template: replaces mask_dir and mask_suffix"):
        _config(tmp_path, defect_dirs=["scratch"], mask_dir="masks", mask_template="m/{stem}.png")
    with pytest.raises(ConfigError, match="mask_template: replaces mask_dir and mask_suffix"):
        _config(tmp_path, defect_dirs=["scratch"], mask_suffix="_gt", mask_template="m/{stem}.png")
    with pytest.raises(ValueError, match="mask_template: only used with format 'folder'"):
        DataConfig(format="mvtec", root=tmp_path, mask_template="{root}/ground_truth/{defect}/{stem}_mask.png")
    cfg = _config(tmp_path, defect_dirs=["scratch"], mask_template="m/{stem}.png")  # no mask_dir needed
    assert cfg.data.mask_template == "m/{stem}.png"
    assert cfg.data.mask_dir is None


def test_mask_template_is_not_part_of_the_fit_key(tmp_path: Path) -> None:
    # Fitting sees good images only; runs fitted before the key existed keep their fit key.
    one = _config(tmp_path, defect_dirs=["scratch"], mask_template="m/{stem}.png")
    other = _config(tmp_path, defect_dirs=["scratch"], mask_template="{root}/gt/{defect}/{name}")
    unset = _config(tmp_path, defect_dirs=["scratch"], missing_masks="empty")
    assert one.fit_key() == other.fit_key()
    assert _config(
        tmp_path, defect_dirs=["scratch"], mask_template="m/{stem}.png", missing_masks="empty"
    ).fit_key() == (unset.fit_key())
    assert one.fit_key() != _config(tmp_path, defect_dirs=["dent"], mask_template="m/{stem}.png").fit_key()


# -- discovery ------------------------------------------------------------------------------------------


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def _dataset(root: Path) -> None:
    for i in range(3):
        _png(root / "good" / f"{i:03d}.png", 10)
    for defect in ("scratch", "dent"):
        for i in range(2):
            _png(root / "defects" / defect / f"{i:03d}.png", 200)


def test_discover_finds_masks_through_the_template(tmp_path: Path) -> None:
    _dataset(tmp_path)
    for defect in ("scratch", "dent"):
        for i in range(2):
            _png(tmp_path / "labels" / f"{defect}-{i:03d}_label.png", 255)
    cfg = DataConfig(
        format="folder",
        root=tmp_path,
        defect_dirs=["defects/scratch", "defects/dent"],
        mask_template="{root}/labels/{defect}-{stem}_label.png",
    )
    splits = discover(cfg)
    assert [s.defect_type for s in splits.test] == ["dent", "dent", "scratch", "scratch"]
    for sample in splits.test:
        assert sample.mask_path == tmp_path / "labels" / f"{sample.defect_type}-{sample.path.stem}_label.png"


def test_default_rule_unchanged_without_a_template(tmp_path: Path) -> None:
    _dataset(tmp_path)
    for defect in ("scratch", "dent"):
        for i in range(2):
            _png(tmp_path / "masks" / "defects" / defect / f"{i:03d}_mask.png", 255)
    cfg = DataConfig(format="folder", root=tmp_path, defect_dirs=["defects/scratch", "defects/dent"], mask_dir="masks")
    same = DataConfig(
        format="folder",
        root=tmp_path,
        defect_dirs=["defects/scratch", "defects/dent"],
        mask_template="masks/{defect_dir}/{stem}_mask.png",
    )
    assert discover(cfg) == discover(same)


def test_missing_masks_name_the_template_and_expected_path(tmp_path: Path) -> None:
    _dataset(tmp_path)
    cfg = DataConfig(format="folder", root=tmp_path, defect_dirs=["defects/scratch"], mask_template="gt/{stem}.png")
    with pytest.raises(DatasetError, match=r"rule: mask_template 'gt/\{stem\}.png'") as err:
        discover(cfg)
    assert str(tmp_path / "gt" / "000.png") in str(err.value)


def test_two_images_sharing_a_mask_is_an_error(tmp_path: Path) -> None:
    _dataset(tmp_path)
    for i in range(2):
        _png(tmp_path / "gt" / f"{i:03d}.png", 255)
    cfg = DataConfig(
        format="folder", root=tmp_path, defect_dirs=["defects/scratch", "defects/dent"], mask_template="gt/{stem}.png"
    )
    with pytest.raises(DatasetError, match=r"would share the mask .*gt/000.png; make mask_template tell them apart"):
        discover(cfg)
