"""Test-time prompt tuning: TPT for any backbone, the structure-induced regulator, meta-training for it.

Names are imported on first use, so `gramvl.tta.cli` (registered by `gramvl --help`) stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TPT": "tpt", "TPTConfig": "tpt", "ContextInit": "tpt", "adamw_step": "tpt", "confident_views": "tpt",
    "marginal_entropy": "tpt", "hand_init": "tpt", "prompt_file_init": "tpt", "gram_init": "tpt",
    "resolve_init": "tpt", "run_tta": "tpt", "run_tta_many": "tpt",
    "StructureContext": "structure", "StructuredRegulator": "structure", "hierarchy_prototypes": "structure",
    "MetaTTAConfig": "meta_tta", "MetaTTAJob": "meta_tta", "ViewFeatureCache": "meta_tta",
    "meta_train_tta": "meta_tta", "run_meta_tta": "meta_tta",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gramvl.tta.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gramvl.tta' has no attribute {name!r}")
