"""The registry of model families: config.json's ``architectures`` (or ``model_type``) -> a Family.

Adding a family: write ``edgecm/families/<name>.py`` with a ``Family``
subclass (see ``base.py`` for what it states) and list an instance here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecm.errors import EdgecmError
from edgecm.families.base import Family
from edgecm.families.llama import LlamaFamily
from edgecm.families.llava import LlavaFamily
from edgecm.families.qwen2_5_vl import Qwen2_5_VLFamily

FAMILIES: tuple[Family, ...] = (LlavaFamily(), Qwen2_5_VLFamily(), LlamaFamily())
_BY_NAME = {f.name: f for f in FAMILIES}


def family_named(name: str) -> Family:
    return _BY_NAME[name]


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_for(raw: dict[str, Any], path: Path) -> Family:
    """The family of a parsed config.json: by ``architectures``, else by ``model_type`` as transformers does."""
    archs = raw.get("architectures") or []
    for arch in archs:
        for family in FAMILIES:
            if arch in family.architectures:
                return family
    if not archs:
        model_type = raw.get("model_type")
        for family in FAMILIES:
            if model_type in family.model_types:
                return family
    found = ", ".join(archs) or f"model_type={raw.get('model_type')!r}"
    raise EdgecmError(
        f"{path}: architecture {found} is not supported; edgecm runs "
        f"{', '.join(supported_architectures())} checkpoints"
    )
