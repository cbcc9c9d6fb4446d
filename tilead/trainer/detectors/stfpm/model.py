"""STFPM (Wang et al., 2021) math: student network, loss and anomaly map.

Student-Teacher Feature Pyramid Matching: a frozen pretrained *teacher* and a
*student* of the same architecture, randomly initialised, trained on
defect-free images to reproduce the teacher's features at a few stages. At
every position ``(i, j)`` of stage ``k`` both feature vectors are
L2-normalised over the channels, ``t^ = t / ||t||``, ``s^ = s / ||s||``, and

* the training loss is ``sum_k mean_ij 0.5 * ||t^_ij - s^_ij||^2`` (the
  paper's ``1 / (2 w_k h_k) sum_ij``, all stage weights 1), averaged over the
  batch;
* the anomaly map of stage ``k`` is ``0.5 * ||t^_ij - s^_ij||^2``; each stage
  map is upsampled bilinearly to the detector's map size and the stage maps
  are multiplied (the paper's choice, ``reduction: product``) or added
  (``reduction: sum``), then optionally blurred by a small Gaussian.

On normal tiles the student has learnt to agree with the teacher; on defects
(never seen in training) it does not.

The map size follows the repository's convention (:func:`map_size`):
``ceil(th / s) x ceil(tw / s)`` for the output stride ``s``, as PaDiM's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.detectors.base import LocationModel
from tilead.trainer.maps import blur_map, gaussian_kernel1d

Reduction = Literal["product", "sum"]
_EPS = 1e-12  # guards the channel norm of an all-zero feature vector


def channel_normalize(feat: torch.Tensor) -> torch.Tensor:
    """L2-normalise every position's feature vector over the channels.

    Args:
        feat: ``(n, c, h, w)``.

    Returns:
        ``(n, c, h, w)``, each ``(c,)`` vector of unit length (zero vectors stay zero).
    """
    return feat / feat.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(_EPS)


def stage_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-position ``0.5 * ||t^ - s^||^2`` of one stage (values in ``[0, 2]``).

    Args:
        teacher: ``(n, c, h, w)`` teacher features (raw or already normalised).
        student: ``(n, c, h, w)`` student features (raw).

    Returns:
        ``(n, 1, h, w)``.
    """
    diff = channel_normalize(teacher) - channel_normalize(student)
    return 0.5 * diff.pow(2).sum(dim=1, keepdim=True)


def stfpm_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """The paper's loss: sum over stages of the mean per-position distance.

    Args:
        teacher: One ``(n, c_k, h_k, w_k)`` tensor per stage.
        student: The student's features, same shapes.

    Returns:
        A scalar (mean over the batch and positions, summed over stages).

    Raises:
        ValueError: If the stage counts or shapes differ.
    """
    if len(teacher) != len(student) or not teacher:
        raise ValueError(f"stfpm_loss: {len(teacher)} teacher stages vs {len(student)} student stages")
    total = torch.zeros((), dtype=torch.float32, device=student[0].device)
    for t, s in zip(teacher, student, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"stfpm_loss: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
        total = total + stage_distance(t, s).mean()
    return total


def make_student(teacher: FeatureExtractor, seed: int) -> nn.Module:
    """A trainable copy of the teacher's (truncated) graph with fresh random weights.

    Every layer gets PyTorch's default initialisation (``reset_parameters``),
    drawn from a generator seeded with ``seed``; BatchNorm statistics start at
    0 / 1. The student returns the same dict of stage outputs as the teacher's
    graph.

    Args:
        teacher: The frozen feature extractor.
        seed: Seed of the initialisation.

    Returns:
        The student graph module in train mode, parameters requiring grad.
    """
    student = copy.deepcopy(teacher.graph)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in student.modules():
            reset = getattr(module, "reset_parameters", None)
            if module is not student and callable(reset):
                reset()
    finally:
        torch.random.set_rng_state(state)
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def student_features(student: nn.Module, layers: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The student's stage outputs, in ``layers`` order.

    Args:
        student: A graph from :func:`make_student`.
        layers: Stage names (the teacher's ``info.layers``).
        x: ``(n, 3, th, tw)`` normalized tiles.

    Returns:
        One ``(n, c_k, h_k, w_k)`` tensor per stage.
    """
    out = student(x)
    return [out[name] for name in layers]


class MapBlur(nn.Module):
    """Separable Gaussian blur of ``(n, 1, h, w)`` maps (reflect padding; radius ``int(4 sigma + 0.5)``)."""

    kernel: torch.Tensor

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.register_buffer("kernel", gaussian_kernel1d(sigma), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur.

        Args:
            x: ``(n, 1, h, w)``.

        Returns:
            ``(n, 1, h, w)``.
        """
        return blur_map(x, self.kernel)


class StfpmLocationModel(LocationModel):
    """Teacher and student in one module: tiles in, anomaly map out.

    Input ``(n, 3, th, tw)`` float32 normalized tiles; output ``(n, 1, h, w)``
    float32 with ``(h, w)`` the detector's map size.

    Args:
        teacher: The frozen pretrained feature extractor (shared by all locations).
        student: This location's trained student graph (see :func:`make_student`).
        size: ``(h, w)`` of the output map.
        reduction: ``product`` (the paper) or ``sum`` of the stage maps.
        blur_sigma: Gaussian blur in map pixels (0: none).
    """

    def __init__(
        self,
        teacher: FeatureExtractor,
        student: nn.Module,
        size: tuple[int, int],
        reduction: Reduction,
        blur_sigma: float,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student.eval()
        for p in self.student.parameters():
            p.requires_grad_(False)
        self.layers = tuple(teacher.info.layers)
        self.size = (int(size[0]), int(size[1]))
        self.reduction = reduction
        self.blur = MapBlur(blur_sigma) if blur_sigma > 0 else None

    def train(self, mode: bool = True) -> StfpmLocationModel:
        """Always stays in eval mode (the student's BatchNorm uses its running statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly map of a tile batch.

        Args:
            x: ``(n, 3, th, tw)`` normalized tiles.

        Returns:
            ``(n, 1, h, w)`` float32.
        """
        t_feats = self.teacher(x)
        s_feats = student_features(self.student, self.layers, x)
        maps = [
            F.interpolate(stage_distance(t, s), size=self.size, mode="bilinear", align_corners=False)
            for t, s in zip(t_feats, s_feats, strict=True)
        ]
        out = maps[0]
        for d in maps[1:]:
            out = out * d if self.reduction == "product" else out + d
        return self.blur(out) if self.blur is not None else out


class FrozenBatchNorm(nn.Module):
    """An eval-mode BatchNorm as a per-channel scale and shift, plus the activation timm fuses into it.

    Output ``act(drop(x * scale + shift))`` with ``scale = weight / sqrt(var + eps)``
    and ``shift = bias - mean * scale``: what the BatchNorm computes in eval
    mode, up to float rounding. Exported graphs keep ``scale`` and ``shift`` as
    named initializers (a BatchNormalization node is folded into the preceding
    convolution's weights by the exporter, which stops the weight swap of
    ``export_like``); ONNX Runtime fuses the multiply-add into the convolution
    when it loads the model.

    Input and output ``(n, c, h, w)``.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("FrozenBatchNorm: the BatchNorm tracks no running statistics")
        c = int(bn.running_mean.numel())
        weight = bn.weight.detach() if bn.weight is not None else torch.ones(c)
        bias = bn.bias.detach() if bn.bias is not None else torch.zeros(c)
        scale = weight / torch.sqrt(bn.running_var.detach() + bn.eps)
        self.register_buffer("scale", scale.reshape(1, c, 1, 1).clone())
        self.register_buffer("shift", (bias - bn.running_mean.detach() * scale).reshape(1, c, 1, 1).clone())
        self.drop = getattr(bn, "drop", None) or nn.Identity()
        self.act = getattr(bn, "act", None) or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Affine, then the activation."""
        out: torch.Tensor = self.act(self.drop(x * self.scale + self.shift))
        return out


def freeze_batchnorm(student: nn.Module) -> nn.Module:
    """A copy of ``student`` with every BatchNorm replaced by :class:`FrozenBatchNorm` (for export).

    Raises:
        ValueError: If a BatchNorm is not called as a module by the graph.
    """
    frozen = copy.deepcopy(student).eval()
    names = [n for n, m in frozen.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in names:
        bn = frozen.get_submodule(name)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        frozen.set_submodule(name, FrozenBatchNorm(bn))
    return frozen
