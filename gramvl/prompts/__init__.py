"""Host methods (CoOp, CoCoOp, KgCoOp, ProGrad, VPT, IVLP, MaPLe, PromptSRC, linear probe, zero-shot) and a registry."""

from __future__ import annotations

import dataclasses
from typing import Any

from gramvl.backbone import Backbone
from gramvl.errors import GramvlError
from gramvl.prompts.base import HostConfig, PromptLearner, Recipe
from gramvl.prompts.cocoop import CoCoOp
from gramvl.prompts.coop import CoOp
from gramvl.prompts.ivlp import IVLP
from gramvl.prompts.kgcoop import KgCoOp
from gramvl.prompts.linear_probe import LinearProbe
from gramvl.prompts.maple import MaPLe
from gramvl.prompts.prograd import ProGrad
from gramvl.prompts.promptsrc import PromptSRC
from gramvl.prompts.vpt import VPT, VPTDeep
from gramvl.prompts.zeroshot import ZeroShot

HOSTS: dict[str, type[PromptLearner]] = {
    "zeroshot": ZeroShot, "coop": CoOp, "cocoop": CoCoOp, "kgcoop": KgCoOp, "prograd": ProGrad,
    "vpt": VPT, "vpt-deep": VPTDeep, "ivlp": IVLP, "maple": MaPLe, "promptsrc": PromptSRC,
    "linear_probe": LinearProbe,
}


def host_class(name: str) -> type[PromptLearner]:
    """The host class registered under `name`."""
    if name not in HOSTS:
        raise GramvlError(f"unknown method {name!r}: choose one of {', '.join(HOSTS)}")
    return HOSTS[name]


def host_config(name: str, bb: Backbone, overrides: dict[str, Any] | None = None) -> HostConfig:
    """The method's paper defaults for this backbone (`default_config`), with `overrides` applied."""
    cfg = host_class(name).default_config(bb)
    fields = {f.name for f in dataclasses.fields(HostConfig)}
    bad = sorted(set(overrides or {}) - fields)
    if bad:
        raise GramvlError(f"unknown host option(s) {', '.join(bad)}: choose from {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **(overrides or {}))


def build_host(name: str, bb: Backbone, classnames: list[str],
               cfg: HostConfig | dict[str, Any] | None = None) -> PromptLearner:
    """Instantiate a host. cfg: a full HostConfig (used as is), or None / a dict of overrides on top of the
    method's paper defaults for this backbone (preferred: methods differ in context length, depth, ...)."""
    cls = host_class(name)
    if not isinstance(cfg, HostConfig):
        cfg = host_config(name, bb, cfg)
    return cls(bb, classnames, cfg)


__all__ = ["HOSTS", "HostConfig", "PromptLearner", "Recipe", "build_host", "host_class", "host_config",
           "CoCoOp", "CoOp", "IVLP", "KgCoOp", "LinearProbe", "MaPLe", "ProGrad", "PromptSRC", "VPT", "VPTDeep",
           "ZeroShot"]
