"""PaDiM's ``model`` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tilead.trainer.detectors.sections import DetectorSection, register_section


@register_section
class PadimConfig(DetectorSection):
    """PaDiM (``family: padim``, the default when ``family`` is omitted).

    Attributes:
        n_features: Random channel subset size.
        covariance_eps: Covariance regularization.
        storage_dtype: dtype of the stored inverse covariances.
    """

    family: Literal["padim"] = "padim"
    n_features: int = Field(default=100, ge=1, le=4096)
    covariance_eps: float = Field(default=0.01, gt=0)
    storage_dtype: Literal["float16", "float32"] = "float16"
