"""How this x86 CPU computes INT8 convolutions: an 8-bit dot product (VNNI, AMX) or AVX2's saturating sums.

ONNX Runtime (and OpenVINO) run an INT8 convolution of uint8 activations and
int8 weights (the ``--precision int8`` bundles) with a single 8-bit dot-product
instruction where the CPU has one: AVX-512 VNNI, AVX-VNNI or AMX-INT8. Without
one they use AVX2's ``vpmaddubsw``, which adds two uint8 x int8 products into a
*saturating* 16-bit sum (255 x 127 x 2 = 64770 exceeds 32767). Weights
quantized to 7 bits (ONNX Runtime's ``reduce_range``, ``tilead-export
--int8-weight-bits 7``) cannot overflow it (255 x 64 x 2 = 32640).

A PaDiM INT8 bundle's heads are refit on the features its INT8 backbone gives on
the exporting CPU, so with 8-bit weights a bundle refit on one kind of CPU and
run on the other sees features its Gaussians were not fitted on. Measured on an
AMD EPYC Zen 3 (AVX2 only), bottle, the other kind emulated with ONNX Runtime's
graph optimizations off (``benchmarks/probe_int8_cross_cpu.py``): refit with
exact sums, run with saturating ones, image AUROC 0.9968 -> 0.9258 and AUPRO
0.9684 -> 0.4816; the other way round 0.8302 and 0.4985; with 7-bit weights
0.9960 / 0.9680 all four ways (docs/cpu_speed.md, "INT8 on a CPU without VNNI"). Hence the manifest's
``model.int8_arithmetic`` and :func:`int8_verdict`.

Only Linux's ``/proc/cpuinfo`` is read; elsewhere the answer is "unknown".
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
"""``/proc/cpuinfo`` flags of an 8-bit dot-product instruction that ONNX Runtime's INT8 kernels use."""
SATURATING_FLAG = "avx2"
"""The flag of the saturating path: an x86 CPU with AVX2 and none of :data:`INT8_DOT_FLAGS`."""
ARITHMETICS = ("dot_product", "saturating")
"""``model.int8_arithmetic``: exact 8-bit dot products (VNNI, AMX), or AVX2's saturating 16-bit pair sums."""
MAX_CPUINFO_BYTES = 1 << 22


def parse_cpu_flags(text: str) -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` text.

    The first ``flags`` line is read (x86 lists the same flags for every
    logical CPU); its value is a space-separated list of lowercase names.

    Args:
        text: The file's contents.

    Returns:
        The flags, empty when no ``flags`` line is found (not x86, or not Linux's format).
    """
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """This machine's CPU flags (:func:`parse_cpu_flags` of ``path``); empty if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return parse_cpu_flags(fh.read(MAX_CPUINFO_BYTES))
    except OSError:
        return frozenset()


def int8_arithmetic(flags: frozenset[str] | None = None) -> str | None:
    """How INT8 convolutions sum here (:data:`ARITHMETICS`).

    Args:
        flags: CPU flags (:func:`parse_cpu_flags`); None reads this machine's.

    Returns:
        ``"dot_product"`` with any of :data:`INT8_DOT_FLAGS`; ``"saturating"`` on an x86 CPU with AVX2 and none of
        them (``vpmaddubsw``); None otherwise (no flags known, or a CPU whose INT8 path was not measured).
    """
    flags = cpu_flags() if flags is None else flags
    if any(flag in flags for flag in INT8_DOT_FLAGS):
        return "dot_product"
    if SATURATING_FLAG in flags:
        return "saturating"
    return None


ARITHMETIC_NAMES = {"dot_product": "an 8-bit dot product (VNNI or AMX)", "saturating": "AVX2's saturating 16-bit sums"}
"""How each of :data:`ARITHMETICS` is described in messages."""
_FIX = (
    "export the run again on this kind of CPU, or with 'tilead-export --precision int8 --int8-weight-bits 7' (the "
    "default), whose weights cannot saturate and which runs the same on both (docs/cpu_speed.md, 'INT8 on a CPU "
    "without VNNI')"
)


def int8_verdict(
    precision: str, weight_bits: int | None, refit_on: str | None, flags: frozenset[str] | None = None
) -> tuple[str, str] | None:
    """Whether an INT8 bundle computes here the features its heads were refit on.

    Only ``int8`` bundles with 8-bit weights can differ (7-bit weights never saturate; ``int8_bf16`` bundles run
    on OpenVINO on CPUs with bf16 units, which all have VNNI).

    Args:
        precision: The bundle's ``model.precision``.
        weight_bits: Its ``model.int8_weight_bits`` (None: not a quantized bundle).
        refit_on: Its ``model.int8_arithmetic`` (:data:`ARITHMETICS`; None: not recorded).
        flags: CPU flags; None reads this machine's.

    Returns:
        None when nothing is wrong or this CPU's arithmetic is unknown; ``("refuse", message)`` when the bundle's
        arithmetic is recorded and this CPU's differs; ``("warn", message)`` when it is not recorded (bundles
        exported before the key).
    """
    if precision != "int8" or weight_bits != 8:
        return None
    here = int8_arithmetic(flags)
    if here is None or here == refit_on:
        return None
    this = ARITHMETIC_NAMES[here]
    if refit_on is None:
        return (
            "warn",
            "this INT8 bundle has 8-bit weights and does not say which INT8 arithmetic its heads were refit on (it "
            f"was exported before tilead recorded it); this CPU uses {this}, and a bundle refit on the other "
            f"kind of CPU gives wrong maps here (bottle: AUPRO 0.968 -> 0.48-0.50): {_FIX}",
        )
    return (
        "refuse",
        f"this INT8 bundle's heads were refit on a CPU with {ARITHMETIC_NAMES[refit_on]}; this CPU computes its "
        f"convolutions with {this}, which give other features with 8-bit weights (bottle: AUPRO 0.968 -> 0.48-0.50): "
        f"{_FIX}",
    )
