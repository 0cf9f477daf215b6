"""Plug a GRAM artifact into any host (SPEC 1.5): copy θ* into matching slots and regulate their gradients
with the frozen ψ* through tensor hooks. The host's recipe is otherwise untouched."""

from __future__ import annotations

from pathlib import Path

import torch

from gramvl import dist
from gramvl.errors import GramvlError
from gramvl.gram.meta import ARTIFACT_FORMAT
from gramvl.gram.regulator import RegulatorSet, modality_of
from gramvl.io import load_tensors
from gramvl.prompts.base import PromptLearner

PARTS = ("both", "init", "regulator")


def resolve_artifact(path: str | Path) -> Path:
    """'default' names the artifact shipped with the package for the default packaged small CLIP
    (meta-trained for CoOp-family hosts): the `gramvl/assets/gram_coop*.safetensors` whose sidecar names that
    model as its backbone. Anything else is a file path."""
    if str(path) == "default":
        import json

        from gramvl.backbone import small_model_ident
        from gramvl.paths import assets_dir

        want = small_model_ident()
        for side in sorted(assets_dir().glob("gram_coop*.json")):
            if json.loads(side.read_text()).get("backbone") == want:
                return side.with_suffix(".safetensors")
        raise GramvlError(f"no shipped GRAM artifact was meta-trained on the packaged small CLIP ({want}); "
                          f"pass an artifact file with --gram (make one with `gramvl meta-train`)")
    return Path(path)


def artifact_digest(path: str | Path) -> str:
    """Content digest of an artifact file (what a run used, whatever its path): part of run identities, so a
    record or checkpoint made with other θ*/ψ* at the same path is never taken for this run's."""
    import hashlib

    p = resolve_artifact(path)
    if not p.is_file():
        raise GramvlError(f"GRAM artifact not found: {p}")
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def _read_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The artifact's tensors and sidecar, read once; anything but a GRAM artifact is an error."""
    tensors, meta = load_tensors(resolve_artifact(path))
    if not meta or meta.get("format") != ARTIFACT_FORMAT:
        raise GramvlError(f"{path} is not a GRAM artifact (written by `gramvl meta-train`)")
    return tensors, meta


def _theta_psi(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[dict[str, torch.Tensor], RegulatorSet | None]:
    theta = {k[len("theta."):]: v for k, v in tensors.items() if k.startswith("theta.")}
    psi = None
    if meta.get("regulator"):
        r = meta["regulator"]
        psi = RegulatorSet(r["widths"], rank=r["rank"], ctx_dim=r.get("ctx_dim", 0),
                           min_cos=r.get("min_cos", -1.0))
        psi.load_state_dict({k[len("psi."):]: v for k, v in tensors.items() if k.startswith("psi.")})
        psi.eval()
        for p in psi.parameters():
            p.requires_grad_(False)
    return theta, psi


def load_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], RegulatorSet | None, dict]:
    """θ* tensors by slot name, the frozen ψ* (None if the artifact has none), and the sidecar."""
    tensors, meta = _read_artifact(path)
    return (*_theta_psi(tensors, meta), meta)


def attach(host: PromptLearner, artifact: str | Path, parts: str = "both") -> dict:
    """Initialize the host's slots from θ* and/or hook ψ* onto their gradients; returns what was done."""
    if parts not in PARTS:
        raise GramvlError(f"--gram-parts must be one of {', '.join(PARTS)}, not {parts!r}")
    tensors, meta = _read_artifact(artifact)
    theta, psi = _theta_psi(tensors, meta)
    if meta["backbone"] != host.bb.ident:
        raise GramvlError(f"checkpoint from another backbone: GRAM artifact {artifact} was meta-trained on "
                          f"{meta['backbone']}, the host uses {host.bb.ident}; re-run `gramvl meta-train` "
                          f"with this model")
    slots = host.slots()
    matched = [n for n in theta if n in slots]
    if not matched:
        raise GramvlError(f"GRAM artifact {artifact} holds slots {sorted(theta)}, host {host.name} has "
                          f"{sorted(slots)}: nothing to attach; meta-train with --host {host.name}")
    done: dict = {"artifact": str(artifact), "parts": parts, "slots": matched, "init": [], "regulated": []}
    for name in matched:
        slot, src = slots[name], theta[name]
        if slot.shape != src.shape:
            if slot.dim() == src.dim() + 1 and slot.shape[1:] == src.shape:  # class-specific context
                src = src.unsqueeze(0).expand_as(slot)
            else:
                raise GramvlError(
                    f"prompt length mismatch: slot {name} of {host.name} has shape {tuple(slot.shape)}, the "
                    f"artifact's is {tuple(theta[name].shape)}; set the host's context length to match "
                    f"(e.g. --set host.n_ctx={theta[name].shape[-2]}) or re-run `gramvl meta-train`")
        if parts in ("both", "init"):
            with torch.no_grad():
                slot.copy_(src)
            done["init"].append(name)
        if parts in ("both", "regulator") and psi is not None:
            reg = psi.regs[modality_of(name)].to(slot.device)  # ψ* loads on the CPU; the slot may be on a GPU
            # ψ is nonlinear: under torchrun it must see the gradient summed over ranks, not this rank's share
            dist.add_gradient_hook(slot, lambda g, reg=reg: reg(g).to(g.dtype))
            done["regulated"].append(name)
    if parts in ("both", "init"):
        # the meta-training host's non-slot parameters θ* was learned with (`gramvl.gram.meta.host_extras`:
        # MaPLe's coupling, CoCoOp's meta-net); none in artifacts written before gramvl stored them
        own = dict(host.named_parameters())
        done["extras"] = []
        extras = {k[len("host."):]: v for k, v in tensors.items() if k.startswith("host.")}
        for name, src in extras.items():
            if name not in own or own[name].shape != src.shape:
                got = tuple(own[name].shape) if name in own else "absent"
                raise GramvlError(f"GRAM artifact {artifact} holds host parameter {name} of shape "
                                  f"{tuple(src.shape)}; host {host.name} has {got}: meta-train with this host "
                                  f"configuration")
            with torch.no_grad():
                own[name].copy_(src)
            done["extras"].append(name)
    host._gram_regulator = psi  # keep ψ alive with the host
    return done
