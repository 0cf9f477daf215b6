import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_random_backbone():
    """A randomly initialized small CLIP with the packaged architecture (no checkpoint needed)."""
    from gramvl.backbone import Backbone, build_small_clip, small_tokenizer
    from gramvl.pretrain import PretrainConfig, _sidecar

    cfg = _sidecar(PretrainConfig(), {})
    torch.manual_seed(0)
    return Backbone(build_small_clip(cfg), small_tokenizer(cfg), "gramvl-small:random", meta=cfg)


@pytest.fixture(scope="session")
def small_packaged():
    """The small CLIP shipped in the package (gramvl/assets)."""
    from gramvl.backbone import load_backbone

    return load_backbone("small")


@pytest.fixture(scope="session")
def vit_b16():
    from gramvl.backbone import load_backbone

    return load_backbone("ViT-B-16", allow_random=True)


@pytest.fixture(scope="session")
def vit_b32():
    from gramvl.backbone import load_backbone

    return load_backbone("ViT-B-32", allow_random=True)


def world_built() -> bool:
    from gramvl.paths import world_dir

    return (world_dir() / "MANIFEST.json").is_file()


requires_world = pytest.mark.skipif(not world_built() and not os.environ.get("CI"),
                                    reason="embedded world not built (make test builds it)")
