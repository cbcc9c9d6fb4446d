"""Where a defective image's mask lies: the folder layout's ``mask_template`` (issue #19 item 5).

A template is a path with placeholders in braces, for example
``"{root}/ground_truth/{defect}/{stem}_mask.png"`` (the MVTec layout) or
``"labels/{stem}.png"`` (every mask in one folder). The placeholders:

========================  ===========================================================  ==========================
placeholder               value                                                        for ``scratch/a/007.jpg``
========================  ===========================================================  ==========================
``{root}``                the dataset root (``data.root``, made absolute)              ``/data/part``
``{defect_dir}``          the ``defect_dirs`` entry the image is in, as written         ``scratch/a``
``{defect}``              the defect type: that entry's last folder name                ``a``
``{stem}``                the image's file name without its extension                   ``007``
``{name}``                the image's file name                                         ``007.jpg``
``{ext}``                 the image's extension without the dot                         ``jpg``
========================  ===========================================================  ==========================

A relative result is relative to the dataset root; ``{{`` and ``}}`` stand for
literal braces. Every template must name the image (``{stem}`` or ``{name}``),
or all images would share one mask. Format specs (``{stem:>5}``), conversions
(``{stem!r}``), positional fields (``{}``, ``{0}``) and attribute or index access
(``{stem.x}``, ``{stem[0]}``) are refused with a message naming what was wrong.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FIELDS", "MaskTemplate"]

FIELDS: dict[str, str] = {
    "root": "the dataset root",
    "defect_dir": "the defect_dirs entry the image is in",
    "defect": "the defect type (the defect folder's name)",
    "stem": "the image's file name without extension",
    "name": "the image's file name",
    "ext": "the image's extension without the dot",
}
"""The placeholders a template may use, with what each stands for."""

_IMAGE_FIELDS = ("stem", "name")


def _allowed() -> str:
    return ", ".join("{" + f + "}" for f in FIELDS)


@dataclass(frozen=True)
class MaskTemplate:
    """A parsed, checked mask path template.

    Attributes:
        text: The template as written.
        fields: The placeholders it uses, in order of first use.
    """

    text: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> MaskTemplate:
        """Check a template and list its placeholders.

        Args:
            text: The template, e.g. ``"{root}/ground_truth/{defect}/{stem}_mask.png"``.

        Returns:
            The parsed template.

        Raises:
            ValueError: If the template is empty, has unbalanced braces, a placeholder other than those in
                :data:`FIELDS`, a format spec, conversion, positional field or attribute/index access, or
                names neither ``{stem}`` nor ``{name}``.
        """
        if not isinstance(text, str) or not text.strip():
            example = "'{root}/masks/{defect}/{stem}.png'"
            raise ValueError(f"expected a mask path template such as {example}, got {text!r}")
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as err:
            raise ValueError(
                f"{text!r}: {err} (placeholders are written {{name}}; write {{{{ and }}}} for literal braces)"
            ) from None
        fields: list[str] = []
        for _, field, spec, conversion in parts:
            if field is None:
                continue
            if field == "" or field.isdigit():
                raise ValueError(f"{text!r}: positional placeholder {{{field}}}; use one of {_allowed()}")
            base = field.split(".", 1)[0].split("[", 1)[0]
            if base != field:
                raise ValueError(f"{text!r}: {{{field}}} accesses an attribute or index; use one of {_allowed()}")
            if field not in FIELDS:
                raise ValueError(f"{text!r}: unknown placeholder {{{field}}}; use one of {_allowed()}")
            if conversion is not None or spec:
                extra = f"!{conversion}" if conversion is not None else ""
                extra += f":{spec}" if spec else ""
                raise ValueError(f"{text!r}: {{{field}{extra}}} has a conversion or format spec; write {{{field}}}")
            if field not in fields:
                fields.append(field)
        if not any(f in fields for f in _IMAGE_FIELDS):
            raise ValueError(
                f"{text!r}: names no image, so every image would share one mask; "
                "put {stem} (file name without extension) or {name} (file name) in it"
            )
        return cls(text=text, fields=tuple(fields))

    def path(self, root: Path, defect_dir: str, image: Path) -> Path:
        """The mask path of ``image`` (in the defect folder ``defect_dir`` under ``root``).

        Args:
            root: The dataset root; a relative result is joined to it.
            defect_dir: The ``defect_dirs`` entry the image is in, as written in the config.
            image: The defective image file.

        Returns:
            The mask file's path (not checked for existence).
        """
        values = {
            "root": str(root),
            "defect_dir": defect_dir.strip("/"),
            "defect": Path(defect_dir).name,
            "stem": image.stem,
            "name": image.name,
            "ext": image.suffix[1:],
        }
        return root / Path(self.text.format(**values)).expanduser()
