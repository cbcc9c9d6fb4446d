"""INT8 on CPUs without VNNI (issue #21): CPU flags, 7-bit weights, the manifest key, the load-time warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import make_bundle
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tilead.exporter.quantize import weights_fact
from tilead.runtime import cpu_features
from tilead.runtime.bundle import PRECISIONS, BundleError, parse_manifest, write_manifest
from tilead.runtime.cpu_features import ARITHMETICS, INT8_DOT_FLAGS, int8_arithmetic, int8_verdict, parse_cpu_flags

FLAG = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12)
ZEN3 = frozenset({"fpu", "sse2", "avx", "avx2", "fma", "bmi2"})
"""Flags of the AMD EPYC Zen 3 the saturation was measured on (a subset: no VNNI, no AVX-512)."""


@settings(max_examples=150, deadline=None)
@given(
    flags=st.frozensets(FLAG, max_size=30), before=st.lists(st.text(max_size=40), max_size=5), cpus=st.integers(1, 3)
)
def test_parse_cpu_flags_reads_the_first_flags_line(flags: frozenset[str], before: list[str], cpus: int) -> None:
    """The flags come back as listed, whatever lines precede them; a later CPU's line does not add to them."""
    noise = [line for line in before if line.split(":")[0].strip() != "flags"]
    block = "\n".join([*noise, "processor\t: 0", f"flags\t\t: {' '.join(sorted(flags))}", "bugs\t\t: spectre"])
    text = "\n\n".join([block] + [block.replace(f"flags\t\t: {' '.join(sorted(flags))}", "flags : other")] * (cpus - 1))
    assert parse_cpu_flags(text) == flags


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_parse_cpu_flags_never_fails_on_other_text(text: str) -> None:
    """Any text gives a set of names (empty without a ``flags`` line); none holds a space or is empty."""
    flags = parse_cpu_flags(text)
    assert all(flag and not any(c.isspace() for c in flag) for flag in flags)
    if not any(line.partition(":")[0].strip() == "flags" and ":" in line for line in text.splitlines()):
        assert flags == frozenset()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (ZEN3, "saturating"),  # AVX2's vpmaddubsw path
        (ZEN3 | {"avx512f", "avx512bw"}, "saturating"),  # AVX-512 without VNNI: vpmaddubsw too
        (ZEN3 | {"avx512f", "avx512_vnni"}, "dot_product"),
        (ZEN3 | {"avx_vnni"}, "dot_product"),
        (ZEN3 | {"amx_int8", "amx_tile"}, "dot_product"),
        (frozenset({"fp", "asimd", "asimddp"}), None),  # an Arm CPU: not measured
        (frozenset({"sse2", "ssse3"}), None),  # x86 without AVX2: not measured
        (frozenset(), None),  # flags unknown
    ],
)
def test_int8_arithmetic(flags: frozenset[str], expected: str | None) -> None:
    assert int8_arithmetic(flags) == expected


@settings(max_examples=200, deadline=None)
@given(
    precision=st.sampled_from(PRECISIONS),
    bits=st.sampled_from([None, 7, 8]),
    refit_on=st.sampled_from([None, *ARITHMETICS]),
    here=st.sampled_from([frozenset(), ZEN3, *(ZEN3 | {flag} for flag in INT8_DOT_FLAGS)]),
)
def test_int8_verdict(precision: str, bits: int | None, refit_on: str | None, here: frozenset[str]) -> None:
    """8-bit int8 bundles only: refused where the recorded arithmetic differs, a warning where it is not recorded."""
    verdict = int8_verdict(precision, bits, refit_on, here)
    arithmetic = int8_arithmetic(here)
    if precision != "int8" or bits != 8 or arithmetic is None or arithmetic == refit_on:
        assert verdict is None
    elif refit_on is None:
        assert verdict is not None
        assert verdict[0] == "warn"
    else:
        assert verdict is not None
        assert verdict[0] == "refuse"
        assert "--int8-weight-bits 7" in verdict[1]
        assert ("refit on a CPU with an 8-bit dot product" in verdict[1]) == (refit_on == "dot_product")


def test_cpu_flags_reads_a_file_and_tolerates_none(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : sse2 avx2 avx512_vnni\n\nprocessor : 1\nflags : sse2 avx2 avx512_vnni\n")
    assert cpu_features.cpu_flags(info) == frozenset({"sse2", "avx2", "avx512_vnni"})
    assert cpu_features.cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_features.cpu_flags(tmp_path) == frozenset()  # a folder: unreadable as a file


# -- the manifest ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = make_bundle(tmp_path_factory.mktemp("bits") / "bundle")
    data: dict[str, Any] = json.loads((root / "manifest.json").read_text())
    return data


@settings(max_examples=60, deadline=None)
@given(
    precision=st.sampled_from(["fp32", "int8"]),
    bits=st.none() | st.sampled_from([7, 8, 6, 9, 0, -8, 7.0, 8.5, True, "7", None]),
    present=st.booleans(),
)
def test_manifest_int8_weight_bits(fp32_data: dict[str, Any], precision: str, bits: object, present: bool) -> None:
    """7 or 8 on an INT8 bundle; absent on an INT8 bundle means 8; anything else, or on FP32, is refused."""
    data = json.loads(json.dumps(fp32_data))
    data["model"]["precision"] = precision
    if present:
        data["model"]["int8_weight_bits"] = bits
    if not present:
        assert parse_manifest(data).int8_weight_bits == (8 if precision == "int8" else None)
        return
    if precision != "int8":
        with pytest.raises(BundleError, match=r"model\.int8_weight_bits: only INT8 bundles have it"):
            parse_manifest(data)
        return
    if bits in (7, 8) and not isinstance(bits, bool):
        assert parse_manifest(data).int8_weight_bits == bits
        return
    with pytest.raises(BundleError, match=r"model\.int8_weight_bits: expected 7 or 8, got"):
        parse_manifest(data)


@settings(max_examples=60, deadline=None)
@given(
    precision=st.sampled_from(["fp32", "int8", "int8_bf16"]),
    value=st.sampled_from([*ARITHMETICS, "vnni", "", 1, None, ["dot_product"]]),
)
def test_manifest_int8_arithmetic(fp32_data: dict[str, Any], precision: str, value: object) -> None:
    """One of the two names on an int8 bundle; anything else, or on another precision, is refused."""
    data = json.loads(json.dumps(fp32_data))
    data["model"]["precision"] = precision
    if precision == "int8_bf16":
        data["layout"] = "shared_backbone"  # refused by layout first otherwise; the key is checked before it
    data["model"]["int8_arithmetic"] = value
    if precision != "int8":
        with pytest.raises(BundleError, match=r"model\.int8_arithmetic: only int8 bundles have it"):
            parse_manifest(data)
    elif value in ARITHMETICS:
        assert parse_manifest(data).int8_arithmetic == value
    else:
        with pytest.raises(BundleError, match=r"model\.int8_arithmetic: expected one of 'dot_product', 'saturating'"):
            parse_manifest(data)


def _labelled_int8(root: Path, bits: int | None, refit_on: str | None = None) -> Path:
    """A small bundle whose manifest says INT8 with ``bits`` (its graphs are FP32: the check reads the manifest)."""
    make_bundle(root)
    data = json.loads((root / "manifest.json").read_text())
    data.pop("manifest_sha256", None)
    data["model"]["precision"] = "int8"
    if bits is not None:
        data["model"]["int8_weight_bits"] = bits
    if refit_on is not None:
        data["model"]["int8_arithmetic"] = refit_on
    write_manifest(root, data)
    return root


@pytest.mark.parametrize(
    ("bits", "refit_on", "flags", "outcome"),
    [
        (8, "dot_product", ZEN3, "refuse"),  # exported on a VNNI machine, run on an AVX2 line PC
        (8, "saturating", ZEN3 | {"avx512_vnni"}, "refuse"),  # the other way round
        (8, "saturating", ZEN3, None),
        (8, "dot_product", ZEN3 | {"amx_int8"}, None),
        (8, None, ZEN3, "warn"),  # exported before the key: unknown
        (None, None, ZEN3, "warn"),  # older still: 8 bits implied
        (8, None, ZEN3 | {"avx_vnni"}, "warn"),
        (7, "dot_product", ZEN3, None),  # 7-bit weights never saturate
        (8, "dot_product", frozenset(), None),  # this CPU unknown
    ],
)
def test_onnxruntime_checks_the_int8_arithmetic(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    bits: int | None,
    refit_on: str | None,
    flags: frozenset[str],
    outcome: str | None,
) -> None:
    from tilead.runtime import Predictor

    bundle = _labelled_int8(tmp_path / "b", bits, refit_on)
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda path=cpu_features.CPUINFO: flags)
    if outcome == "refuse":
        with pytest.raises(ValueError, match="this INT8 bundle's heads were refit on a CPU with") as err:
            Predictor(bundle, backend="onnxruntime")
        assert "--int8-weight-bits 7" in str(err.value)
        return
    with (
        caplog.at_level(logging.WARNING, logger="tilead.runtime.backends.onnxruntime"),
        Predictor(bundle, backend="onnxruntime") as predictor,
    ):
        assert predictor.manifest.int8_weight_bits == (8 if bits is None else bits)
        assert predictor.manifest.int8_arithmetic == refit_on
    assert ("does not say which INT8 arithmetic" in caplog.text) is (outcome == "warn")


# -- the export's options ----------------------------------------------------------------------------------------


def test_bad_weight_bits_are_refused(tmp_path: Path) -> None:
    from tilead.cli.export import main
    from tilead.exporter.bundle import export_bundle
    from tilead.exporter.quantize import check_weight_bits, default_weight_bits, weights_fact

    assert (default_weight_bits("int8"), default_weight_bits("int8_bf16")) == (7, 8)
    assert check_weight_bits(7) == 7
    for bad in (6, 9, True, 7.0):
        with pytest.raises(ValueError, match="int8_weight_bits: expected 7 or 8, got"):
            check_weight_bits(bad)  # type: ignore[arg-type]
    assert weights_fact(8) == "int8 per-channel"
    assert "7-bit" in weights_fact(7)
    with pytest.raises(ValueError, match="int8_weight_bits 7: applies to int8 and int8_bf16, not 'fp32'"):
        export_bundle(tmp_path / "no_run", tmp_path / "out", precision="fp32", int8_weight_bits=7, progress=False)
    runner = CliRunner()
    result = runner.invoke(main, [str(tmp_path), "-o", str(tmp_path / "b"), "--int8-weight-bits", "7"])
    assert result.exit_code == 2
    assert "applies to --precision int8 or int8_bf16" in result.output
    result = runner.invoke(
        main, [str(tmp_path), "-o", str(tmp_path / "b"), "--precision", "int8", "--int8-weight-bits", "6"]
    )
    assert result.exit_code == 2
    assert "6 is not in the range 7<=x<=8" in result.output
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "b").exists()


@pytest.mark.integration
def test_int8_exports_7_bit_weights_by_default_and_record_this_cpu(
    tiny_trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """``tilead-export --precision int8``: 7-bit weights (within [-64, 64]) unless 8 is asked for, recorded.

    The manifest records the bits and this CPU's INT8 arithmetic; the CLI says where the bundle runs.
    """
    import onnx
    from onnx import numpy_helper

    from tilead.cli.export import main

    run, _ = tiny_trained
    largest: dict[int, int] = {}
    for bits in (None, 8):
        out = tmp_path / f"w{bits}"
        args = [str(run), "-o", str(out), "--precision", "int8", "--layout", "shared_backbone"]
        args += ["--parity-tolerance", "2", "--no-progress"] + (
            [] if bits is None else ["--int8-weight-bits", str(bits)]
        )
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        manifest = parse_manifest(json.loads((out / "manifest.json").read_text()))
        want = 7 if bits is None else bits
        assert manifest.int8_weight_bits == want
        assert manifest.int8_arithmetic == int8_arithmetic()
        assert manifest.raw["source"]["quantization"]["weights"] == weights_fact(want)
        assert f"weights:    {want}-bit INT8; " in result.output
        assert ("runs alike on any x86 CPU" in result.output) == (want == 7)
        graph = onnx.load(str(out / "backbone.onnx")).graph
        weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert weights
        largest[want] = max(int(abs(w.astype(int)).max()) for w in weights)
    assert largest[7] <= 64 < largest[8] <= 127


@pytest.mark.parametrize(
    ("arithmetic", "plain", "fused"), [("saturating", "vnni", "avx2"), ("dot_product", "plain", "vnni")]
)
def test_cross_cpu_probe_labels_its_sides_by_this_cpu(arithmetic: str, plain: str, fused: str) -> None:
    """Without VNNI the probe's plain side emulates VNNI; with VNNI the fused kernels are the real VNNI side."""
    from bench_module import load_benchmark

    probe = load_benchmark("probe_int8_cross_cpu")
    labels = probe.side_labels(arithmetic)
    assert labels == {"plain": plain, "fused": fused}
    assert set(labels) == set(probe.SIDES)


def test_cross_cpu_probe_refuses_a_cpu_of_unknown_arithmetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not x86 with AVX2 (or flags unreadable): the probe stops before exporting anything."""
    from bench_module import load_benchmark

    probe = load_benchmark("probe_int8_cross_cpu")
    monkeypatch.setattr(probe, "int8_arithmetic", lambda: None)
    with pytest.raises(SystemExit, match="INT8 arithmetic is unknown"):
        probe.main([str(tmp_path / "run"), str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()
