"""benchmarks/bench_cpu_speed.py and bench_backbone_split.py: the variant and configuration parsers (outside input)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from bench_module import load_benchmark
from hypothesis import given
from hypothesis import strategies as st

CPU = load_benchmark("bench_cpu_speed")  # its folder on sys.path: it imports bench_predictor
SPLIT = load_benchmark("bench_backbone_split")


@pytest.mark.parametrize(
    ("text", "bundle", "options"),
    [
        ("per_location:fp32", "per_location:fp32", {}),
        ("shared_backbone:int8@onnxruntime", "shared_backbone:int8", {"backend": "onnxruntime"}),
        ("shared_backbone:fp32@openvino", "shared_backbone:fp32", {"backend": "openvino"}),
        ("shared_backbone:fp32@openvino+bf16", "shared_backbone:fp32", {"backend": "openvino", "bf16_backbone": True}),
        ("shared_backbone:bf16@hybrid", "shared_backbone:bf16", {"backend": "hybrid"}),
        ("shared_backbone:bf16@hybrid-onnx", "shared_backbone:bf16", {"backend": "hybrid", "native_heads": False}),
        ("shared_backbone:bf16", "shared_backbone:bf16", {}),
        ("shared_backbone:bf16@openvino", "shared_backbone:bf16", {"backend": "openvino"}),
        ("shared_backbone:int8_bf16@hybrid", "shared_backbone:int8_bf16", {"backend": "hybrid"}),
        (
            "shared_backbone:int8_bf16@hybrid-onnx",
            "shared_backbone:int8_bf16",
            {"backend": "hybrid", "native_heads": False},
        ),
        ("shared_backbone:int8_bf16", "shared_backbone:int8_bf16", {}),
    ],
)
def test_variants_name_a_bundle_and_the_predictor_options(text: str, bundle: str, options: dict[str, object]) -> None:
    assert CPU.parse_variant(text) == (bundle, options)
    assert CPU.variant_arg(text) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shared:fp32", "the bundle part must be one of"),
        ("shared_backbone:fp32@tensorrt", "BACKEND one of onnxruntime, openvino, hybrid"),
        ("shared_backbone:fp32@openvino+fp16", "BACKEND one of onnxruntime, openvino"),
        ("shared_backbone:bf16@onnxruntime", "a bf16 bundle runs @hybrid"),
        ("shared_backbone:fp32@hybrid", "@hybrid runs bf16 bundles only"),
        ("shared_backbone:fp32@hybrid-onnx", "@hybrid runs bf16 bundles only"),
        ("shared_backbone:bf16@hybrid+bf16", r"\+bf16 needs a shared_backbone bundle @openvino"),
        ("per_location:bf16", "the bundle part must be one of"),
        ("per_location:fp32@openvino+bf16", r"\+bf16 needs a shared_backbone bundle @openvino"),
        ("shared_backbone:fp32@onnxruntime+bf16", r"\+bf16 needs a shared_backbone bundle @openvino"),
        ("shared_backbone:int8@openvino", "the OpenVINO backend refuses INT8 bundles"),
        ("shared_backbone:int8@openvino+bf16", "the OpenVINO backend refuses INT8 bundles"),
        ("shared_backbone:int8_bf16@onnxruntime", "a bf16 bundle runs @hybrid"),
        ("shared_backbone:int8@hybrid", "@hybrid runs bf16 bundles only"),
        ("per_location:int8_bf16", "the bundle part must be one of"),
    ],
)
def test_bad_variants_say_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        CPU.parse_variant(text)


@given(st.text(max_size=30))
def test_any_variant_text_parses_or_is_refused_with_argparse_error(text: str) -> None:
    try:
        bundle, options = CPU.parse_variant(text)
    except argparse.ArgumentTypeError:
        return
    assert bundle in CPU.VARIANTS
    assert set(options) <= {"backend", "bf16_backbone"}


@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64))
def test_split_configs_round_trip(w: int, t: int, k: int) -> None:
    assert SPLIT.parse_config(f"{w}x{t}x{k}") == (w, t, k)


@pytest.mark.parametrize("text", ["2x1", "0x1x1", "2x1x-1", "axbxc", "2x1x1x1", ""])
def test_bad_split_configs_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected WORKERSxTHREADSxTILES"):
        SPLIT.parse_config(text)


@pytest.mark.parametrize(
    ("variant", "on_disk", "asked", "exported"),
    [
        ("shared_backbone:int8", None, None, ["--int8-weight-bits", "7"]),  # an 8-bit bundle from before: redone
        ("shared_backbone:int8", 7, None, None),  # the default, already there: kept
        ("shared_backbone:int8", 7, 8, ["--int8-weight-bits", "8"]),
        ("shared_backbone:int8", 8, 8, None),
        ("shared_backbone:fp32", None, None, None),  # no weight bits for FP32
    ],
)
def test_a_cached_int8_bundle_is_kept_only_with_the_weight_bits_asked_for(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
    on_disk: int | None,
    asked: int | None,
    exported: list[str] | None,
) -> None:
    import json

    layout, precision = variant.split(":")
    model: dict[str, object] = {"precision": precision, "family": "stfpm"}  # stfpm: stale_heads does not apply
    if on_disk is not None:
        model["int8_weight_bits"] = on_disk
    (tmp_path / "manifest.json").write_text(json.dumps({"layout": layout, "model": model}))
    calls: list[list[str]] = []
    monkeypatch.setattr(CPU, "sh", lambda cmd: calls.append(list(cmd)))
    assert CPU.ensure_bundle(tmp_path / "run", tmp_path, variant, None, asked) == tmp_path
    if exported is None:
        assert calls == []
    else:
        assert len(calls) == 1
        assert calls[0][-2:] == exported


def test_a_relative_work_folder_trains_on_its_absolute_data_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config resolves a relative ``data.root`` against its own folder: the big run gets an absolute one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w" / "data64" / "train").mkdir(parents=True)  # the data exists: nothing generated
    calls: list[list[str]] = []
    monkeypatch.setattr(CPU, "sh", lambda cmd: calls.append(list(cmd)))
    data, run = CPU.ensure_big_run(Path("w"), 64, 4)
    assert data == tmp_path / "w" / "data64"
    assert run == Path("w") / "run64"
    roots = [c for c in calls[0] if c.startswith("data.root=")]
    assert roots == [f"data.root={tmp_path / 'w' / 'data64'}"]
