"""Synthetic anomalies for validation on good images only (NumPy only; no torch, OpenCV or SciPy)."""

from tilead.synthesis.defects import KINDS, SyntheticDefect, synthesize_defects
from tilead.synthesis.perlin import fractal_noise, perlin_noise

__all__ = ["KINDS", "SyntheticDefect", "fractal_noise", "perlin_noise", "synthesize_defects"]
