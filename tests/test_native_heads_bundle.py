"""Native PaDiM heads in bf16 bundles (#21): the manifest entry, verification, the hybrid backend, the export.

Fast tests use the synthetic shared bundle of :mod:`bundle_factory` marked ``bf16``: its head ``i``
maps features ``(m, 2 m)`` to ``1.5 m gain_i``, which a native head with zero mean and ``A = diag(a^2, 0)``,
``a = 1.5 gain_i``, reproduces exactly where ``m >= 0`` (bright images). The integration test exports the
session's tiny trained PaDiM run in bf16 and compares the native heads with the ONNX heads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import FEATURES, make_shared_bundle
from test_bf16 import BF16, NO_BF16_UNITS, bf16_export  # noqa: F401 (the tiny run's bf16 export fixture)

from tilead.runtime import BundleError, Predictor, read_manifest, verify_files
from tilead.runtime.bundle import sha256_file, write_manifest
from tilead.runtime.native_heads import NativeHead, native_file


def _add_native_heads(bundle: Path) -> Path:
    """Native heads equal to the synthetic heads on non-negative features; listed in the manifest."""
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    data["model"]["precision"] = "bf16"
    manifest = read_manifest(bundle)
    h, w = manifest.map_size
    entries = []
    for i, loc in enumerate(manifest.models):
        a = 1.5 * (1.0 + 0.25 * i) / ((FEATURES + 1) / 2)
        packed = np.zeros((h * w, FEATURES * (FEATURES + 1) // 2), np.float16)
        packed[:, 0] = a * a
        head = NativeHead(np.zeros((h * w, FEATURES), np.float32), packed, np.zeros(0, np.float32), (h, w))
        rel = native_file(loc.file)
        head.save(bundle / rel)
        entries.append(
            {"name": loc.name, "file": rel, "sha256": sha256_file(bundle / rel), "bytes": (bundle / rel).stat().st_size}
        )
    data["native_heads"] = entries
    write_manifest(bundle, data)
    return bundle


@pytest.fixture(scope="module")
def native_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _add_native_heads(make_shared_bundle(tmp_path_factory.mktemp("native") / "b"))


def _bright(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(160, 256, (n, 64, 64, 3), dtype=np.uint8)


def _copy(bundle: Path, to: Path) -> Path:
    return Path(shutil.copytree(bundle, to))


def test_the_manifest_lists_one_native_head_per_model(native_bundle: Path) -> None:
    manifest = read_manifest(native_bundle)
    assert [e.file for e in manifest.native_heads] == [f"heads/{m.name}.padim.npz" for m in manifest.models]
    assert [e.name for e in manifest.native_heads] == [m.name for m in manifest.models]
    verify_files(native_bundle, manifest)


def test_bad_native_head_entries_are_refused(native_bundle: Path, tmp_path: Path) -> None:
    data: dict[str, Any] = json.loads((native_bundle / "manifest.json").read_text())
    cases = [
        ({**data, "native_heads": data["native_heads"][:3]}, r"native_heads: expected a list of 4 entries"),
        (
            {**data, "native_heads": [{**data["native_heads"][0], "file": "heads/r0c1.padim.npz"},
                                      *data["native_heads"][1:]]},
            r"native_heads\[0\]\.file: location r0c0 must use its own file 'heads/r0c0.padim.npz'",
        ),
        ({**data, "model": {**data["model"], "precision": "fp32"}}, r"only bf16 bundles carry native heads"),
    ]  # fmt: skip
    for i, (bad, match) in enumerate(cases):
        bundle = _copy(native_bundle, tmp_path / f"b{i}")
        write_manifest(bundle, bad)
        with pytest.raises(BundleError, match=match):
            read_manifest(bundle)


def test_a_modified_or_missing_native_head_is_refused(native_bundle: Path, tmp_path: Path) -> None:
    tampered = _copy(native_bundle, tmp_path / "tampered")
    path = tampered / "heads" / "r1c0.padim.npz"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"sha256 of .*r1c0\.padim\.npz is .* \(the file was modified"):
        verify_files(tampered, read_manifest(tampered))
    missing = _copy(native_bundle, tmp_path / "missing")
    (missing / "heads" / "r0c1.padim.npz").unlink()
    with pytest.raises(BundleError, match=r"r0c1\.padim\.npz"):
        verify_files(missing, read_manifest(missing))
    if BF16:
        for bundle, name in ((tampered, "r1c0"), (missing, "r0c1")):
            with pytest.raises(BundleError, match=rf"{name}\.padim\.npz"):
                Predictor(bundle, threads=1)


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
def test_a_head_file_that_does_not_fit_the_bundle_is_refused(native_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(native_bundle, tmp_path / "b")
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    # A valid head file of 3 features where the backbone gives 2.
    NativeHead(np.zeros((25, 3), np.float32), np.zeros((25, 6), np.float16), np.zeros(0, np.float32), (5, 5)).save(
        bundle / "heads" / "r0c0.padim.npz"
    )
    entry = data["native_heads"][0]
    entry["sha256"], entry["bytes"] = sha256_file(bundle / entry["file"]), (bundle / entry["file"]).stat().st_size
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match=r"model r0c0: native head heads/r0c0.padim.npz has 3 features"):
        Predictor(bundle, threads=1)


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
@pytest.mark.parametrize(("threads", "workers", "max_batch"), [(1, 1, 8), (2, 2, 3)])
def test_hybrid_native_heads_give_the_onnx_heads_maps(
    native_bundle: Path, threads: int, workers: int, max_batch: int
) -> None:
    images = _bright(5)
    kwargs: dict[str, Any] = {"threads": threads, "location_workers": workers, "max_batch": max_batch}
    with (
        Predictor(native_bundle, **kwargs) as native,
        Predictor(native_bundle, native_heads=False, **kwargs) as graphs,
    ):
        assert native.backend == graphs.backend == "hybrid"
        assert native.providers[1].startswith("tilead native PaDiM heads (")
        assert graphs.providers[1].startswith("ONNX Runtime ")
        got, want = native.location_maps(images), graphs.location_maps(images)
        assert float(want.min()) > 0  # bright images: the synthetic heads' features are positive
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.max()))
        results, expected = native.predict(images), graphs.predict(images)
    assert isinstance(results, list)
    assert isinstance(expected, list)
    for r, e in zip(results, expected, strict=True):
        assert r.score == pytest.approx(e.score, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(r.anomaly_map, e.anomaly_map, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
def test_a_one_image_call_queues_the_heads_behind_the_backbone(
    native_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At batch 1 the hybrid backend runs its backbone calls and heads in one queue, with the same maps."""
    import tilead.runtime.backends.hybrid as hybrid
    from tilead.runtime.backends.pipelined import backbone_then_heads as queued

    calls: list[int] = []

    def counting(*args: Any) -> Any:
        calls.append(args[1].images)
        return queued(*args)

    monkeypatch.setattr(hybrid, "backbone_then_heads", counting)
    images = _bright(3, seed=4)
    with Predictor(native_bundle, threads=2, location_workers=2, max_batch=3) as p:
        batch = p.location_maps(images)
        assert calls == []  # three images: the barrier
        one = [p.location_maps(images[i : i + 1]) for i in range(3)]
        assert calls == [1, 1, 1]
    np.testing.assert_array_equal(np.concatenate(one, axis=1), batch)
    with Predictor(native_bundle, threads=1, location_workers=1) as p:
        p.location_maps(images[:1])
    assert calls == [1, 1, 1]  # one worker: nothing to queue behind


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
def test_an_old_bf16_bundle_without_native_heads_runs_its_onnx_heads(native_bundle: Path, tmp_path: Path) -> None:
    old = _copy(native_bundle, tmp_path / "old")
    data: dict[str, Any] = json.loads((old / "manifest.json").read_text())
    del data["native_heads"]
    write_manifest(old, data)
    with Predictor(old, threads=1) as predictor:
        assert predictor.providers[1].startswith("ONNX Runtime ")
        assert np.isfinite(predictor.location_maps(_bright(1))).all()


def test_native_heads_must_be_a_bool(native_bundle: Path) -> None:
    with pytest.raises(ValueError, match=r"native_heads: expected True or False, got 1"):
        Predictor(native_bundle, native_heads=1)  # type: ignore[arg-type]


@pytest.mark.integration
def test_a_bf16_export_writes_native_heads_equal_to_its_onnx_heads(bf16_export: Any) -> None:  # noqa: F811
    """The tiny run's bf16 bundle: a native head per model, its parity recorded, the hybrid's maps as the graphs'."""
    from tilead.exporter.bf16 import BF16_HEAD_TOLERANCE, NATIVE_HEAD_TOLERANCE, NATIVE_VS_GRAPH_ERROR

    bundle = bf16_export.bundle
    manifest = read_manifest(bundle)
    assert len(manifest.native_heads) == len(manifest.models)
    quant = bf16_export.manifest["source"]["quantization"]
    assert 0 <= quant["graph_head_exact"] <= BF16_HEAD_TOLERANCE
    # each location passed one of the export's rules; the tiny run's largest figures pass one of them too
    by_tolerance = quant["native_head_exact"] <= max(
        NATIVE_HEAD_TOLERANCE, NATIVE_VS_GRAPH_ERROR * quant["graph_head_exact"]
    )
    assert quant["native_head_exact"] >= 0
    assert by_tolerance or 0 <= quant["native_head_vs_rounding_bound"] <= 1.0
    assert quant["native_head_parity"] <= quant["native_head_exact"] + quant["graph_head_exact"]
    for entry in manifest.native_heads:
        head = NativeHead.from_bytes((bundle / entry.file).read_bytes())
        assert head.size == manifest.map_size
        assert head.channels == manifest.features[0]  # type: ignore[index]
    images = np.random.default_rng(5).integers(0, 256, (3, *manifest.grid.image_size, 3), dtype=np.uint8)
    with Predictor(bundle, threads=2) as native, Predictor(bundle, threads=2, native_heads=False) as graphs:
        assert native.providers[1].startswith("tilead native PaDiM heads")
        got, want = native.location_maps(images), graphs.location_maps(images)
        span = float(want.max() - want.min())
        assert float(np.abs(got - want).max()) <= 1e-3 * span
        results, expected = native.predict(images), graphs.predict(images)
    assert isinstance(results, list)
    assert isinstance(expected, list)
    for r, e in zip(results, expected, strict=True):
        assert r.label == e.label
        assert r.score == pytest.approx(e.score, rel=1e-3, abs=1e-4)


def test_the_heads_benchmark_smoke_runs(native_bundle: Path, tmp_path: Path) -> None:
    """benchmarks/bench_padim_heads.py in a subprocess, tiny: the table and the JSON of both batches."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_padim_heads.py"
    out = tmp_path / "heads.json"
    cmd = [sys.executable, str(script), str(native_bundle), "--model", "2", "--batch", "1", "3", "--repeats", "2",
           "--path", "scalar", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "model r1c0: d=2, map 5x5, kernel path scalar" in done.stdout
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 3]
    assert all(r["native_ms"] > 0 and r["onnxruntime_ms"] > 0 for r in report["rows"])


def test_the_head_layouts_benchmark_smoke_runs(native_bundle: Path, tmp_path: Path) -> None:
    """benchmarks/bench_head_layouts.py in a subprocess, tiny: both forms agree and the JSON has every row."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_head_layouts.py"
    out = tmp_path / "layouts.json"
    cmd = [sys.executable, str(script), str(native_bundle), "--batch", "1", "2", "--repeats", "2",
           "--paths", "scalar", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "d=2, map 5x5, 2 workers" in done.stdout
    report = json.loads(out.read_text())
    assert [(r["batch"], r["path"]) for r in report["rows"]] == [(1, "scalar"), (2, "scalar")]
    assert all(r["rows_ms"] > 0 and r["lanes_ms"] > 0 for r in report["rows"])
    assert all(r["max_diff_of_range"] <= 1e-5 for r in report["rows"])  # the two forms compute the same maps
