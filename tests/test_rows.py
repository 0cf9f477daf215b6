"""Row-parallel encoding: the cut of a batch depends only on its length, its gradients are those of the whole
batch, and prompt tuning gives the same bytes at 1 and 2 threads."""

import pytest
import torch
from PIL import Image

from gramvl.errors import GramvlError
from gramvl.rows import ROW_PARTS, row_apply, row_map, row_parallel, spans


def test_the_cut_depends_only_on_the_number_of_rows():
    assert spans(4, 4) == [(0, 2), (2, 4)] and spans(1) == [(0, 1)]  # at least MIN_PART = 2 rows a part
    assert len(spans(100)) == ROW_PARTS and spans(9, 4) == [(0, 3), (3, 6), (6, 9)]
    assert spans(20, 8) == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (15, 18), (18, 20)]
    for n in (1, 7, 33, 256):
        cut = spans(n)
        assert cut[0][0] == 0 and cut[-1][1] == n and all(a[1] == b[0] for a, b in zip(cut, cut[1:], strict=False))


def test_row_map_gives_the_whole_batchs_output_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 5, generator=g, requires_grad=True)  # rows
    w = torch.randn(5, 3, generator=g, requires_grad=True)  # shared by every row
    b = torch.randn(11, 3, generator=g, requires_grad=True)  # rows

    def fn(x, b, w):
        return torch.tanh(x @ w) + b

    with row_parallel():
        out = row_map(fn, [x, b], [w])
        out.pow(2).sum().backward()
    got = (out.detach(), x.grad.clone(), b.grad.clone(), w.grad.clone())
    for t in (x, b, w):
        t.grad = None
    ref = fn(x, b, w)
    ref.pow(2).sum().backward()
    for a, r in zip(got, (ref.detach(), x.grad, b.grad, w.grad), strict=True):
        assert torch.allclose(a, r, atol=1e-6)
    with torch.no_grad():  # the no-grad path cuts the same way
        assert torch.allclose(row_apply(lambda x, n, b, w: fn(x, b, w), [x, None, b, w], [True, False, True, False]),
                              ref, atol=1e-6)


def _toy(tmp_path):
    from gramvl.data.base import ImageDataset

    rows = []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (20, 20), (30 * i, 250 - 25 * i, 60 + 10 * i)).save(p)
        rows.append((str(p), i % 4))
    return ImageDataset("toy", "train", ["cat", "dog", "car", "tree"], rows)


@pytest.mark.parametrize("method", ["vpt", "maple"])
def test_prompt_tuning_gives_the_same_prompts_and_logits_at_1_and_2_threads(small_packaged, tmp_path, method):
    """On the CPU the image tower's sums depend on the thread count (the prompts VPT and MaPLe learn differed
    between 1 and 2 threads before session 17); with the rows cut they are equal bit for bit."""
    from gramvl.engine.train import Trainer, predict
    from gramvl.prompts import build_host
    from gramvl.prompts.base import Recipe

    ds = _toy(tmp_path)
    before = torch.get_num_threads()
    out = {}
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            host = build_host(method, small_packaged, ds.classnames, {"seed": 1})
            Trainer(host, Recipe(epochs=2, lr=0.5, batch_size=8, warmup_epochs=0), seed=1, progress=False).fit(ds)
            assert torch.get_num_threads() == th
            out[th] = ({k: v.clone() for k, v in host.trainable_state().items()}, predict(host, ds)[0])
    finally:
        torch.set_num_threads(before)
    (s1, l1), (s2, l2) = out[1], out[2]
    assert all(torch.equal(s1[k], s2[k]) for k in s1) and torch.equal(l1, l2)
    start = build_host(method, small_packaged, ds.classnames, {"seed": 1}).trainable_state()
    assert not all(torch.equal(start[k], s1[k]) for k in s1)  # it trained


def test_an_unknown_cpu_parallel_mode_is_a_clear_error(small_random_backbone):
    from gramvl.engine.train import Trainer
    from gramvl.prompts import build_host
    from gramvl.prompts.base import Recipe

    with pytest.raises(GramvlError, match="cpu_parallel must be one of rows, intra-op"):
        Trainer(build_host("coop", small_random_backbone, ["a", "b"]), Recipe(), seed=1, cpu_parallel="threads")
