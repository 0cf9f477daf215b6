"""Add the meta-training host's extras to a GRAM artifact written before gramvl stored them.

`gramvl meta-train` now stores the host's non-slot parameters (MaPLe's coupling maps, CoCoOp's meta-net) in
the artifact, and `attach` restores them (`gramvl.gram.meta.host_extras`). Artifacts from earlier sessions
lack them. Hosts are built deterministically from their config (the seed in `meta.host_cfg`, default 0),
so rebuilding the meta-training host gives exactly the values meta-training saw; this script checks that
two rebuilds agree, then writes a copy of the artifact with the extras added (θ*, ψ* unchanged).

    python benchmarks/artifact_extras.py runs/gram6/maple_anchor05.safetensors runs/gram6/maple_anchor05x.safetensors
"""

from __future__ import annotations

import argparse

import torch

from gramvl.backbone import load_backbone
from gramvl.errors import GramvlError
from gramvl.gram.attach import load_artifact
from gramvl.gram.meta import host_extras
from gramvl.io import load_tensors, save_tensors
from gramvl.prompts import build_host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("out")
    ap.add_argument("--model", default="small")
    ap.add_argument("--weights", default=None)
    a = ap.parse_args()
    _, _, meta = load_artifact(a.artifact)
    if meta.get("host_extras"):
        raise GramvlError(f"{a.artifact} already holds host extras: {sorted(meta['host_extras'])}")
    bb = load_backbone(a.model, a.weights)
    if bb.ident != meta["backbone"]:
        raise GramvlError(f"{a.artifact} was meta-trained on {meta['backbone']}, not {bb.ident}")
    cfg = meta["config"]
    builds = [host_extras(build_host(cfg["host"], bb, ["placeholder"], cfg.get("host_cfg") or {})) for _ in range(2)]
    if not builds[0]:
        raise GramvlError(f"host {cfg['host']} has no parameters outside its slots: nothing to add")
    if any(not torch.equal(builds[0][n], builds[1][n]) for n in builds[0]):
        raise GramvlError("two builds of the host gave different extras: its construction is not deterministic")
    tensors, side = load_tensors(a.artifact)
    tensors.update({f"host.{n}": v for n, v in builds[0].items()})
    side["host_extras"] = {n: list(v.shape) for n, v in builds[0].items()}
    side["host_extras_source"] = (f"added by benchmarks/artifact_extras.py: rebuilt {cfg['host']} host with "
                                  f"host_cfg {cfg.get('host_cfg') or {}} (the meta-training host's config)")
    save_tensors(a.out, tensors, side)
    print(f"wrote {a.out}: {len(builds[0])} extras ({', '.join(sorted(builds[0]))})")


if __name__ == "__main__":
    main()
