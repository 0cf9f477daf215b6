"""Typed configs: a dataclass, filled from YAML and `key=value` overrides through OmegaConf (type-checked)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gramvl.errors import GramvlError

T = TypeVar("T")


def build_config(cls: type[T], yaml_path: str | None = None, values: dict | None = None,
                 overrides: list[str] | None = None) -> T:
    """cls defaults <- YAML file <- explicit values (None skipped) <- dotted overrides like host.n_ctx=16."""
    try:
        conf = OmegaConf.structured(cls)
        if yaml_path:
            if not Path(yaml_path).is_file():
                raise GramvlError(f"config file not found: {yaml_path}")
            conf = OmegaConf.merge(conf, OmegaConf.load(yaml_path))
        if values:
            names = {f.name for f in fields(cls)}
            conf = OmegaConf.merge(conf, {k: v for k, v in values.items() if v is not None and k in names})
        if overrides:
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        raise GramvlError(f"invalid configuration: {e}".splitlines()[0]) from e
    assert is_dataclass(obj)
    return obj  # type: ignore[return-value]
