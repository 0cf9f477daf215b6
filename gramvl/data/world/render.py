"""Rasterizing artwork and drawing random, seeded renderings of it (the downstream instances)."""

from __future__ import annotations

import hashlib
import io
import math
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT_SIZE = 64
ART_SIZE = 96
SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
_SEED_BITS = 60


class RenderTimeout(Exception):
    """An SVG took longer than its per-file time limit."""


@contextmanager
def time_limit(seconds: float):
    """Raise RenderTimeout after `seconds` (SIGALRM; only in a process's main thread, else no limit)."""
    try:
        old = signal.signal(signal.SIGALRM, _on_alarm)
    except ValueError:  # not the main thread: run without a limit
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _on_alarm(signum, frame):
    raise RenderTimeout()


def instance_seed(dataset: str, split: str, classname: str, index: int) -> int:
    """Seed of one instance; the split id sits in the top bits, so train, val and test seeds are disjoint."""
    digest = hashlib.sha256(f"{dataset}|{split}|{classname}|{index}".encode()).digest()
    low = int.from_bytes(digest[:8], "big") & ((1 << _SEED_BITS) - 1)
    return (SPLIT_IDS[split] << _SEED_BITS) | low


def rasterize_svg(data: bytes, size: int) -> Image.Image:
    """Render SVG bytes to RGBA with the longer side `size` px (aspect kept); external files are never read."""
    import cairosvg

    png = cairosvg.svg2png(bytestring=data, output_width=size)
    im = Image.open(io.BytesIO(png))
    if im.height > im.width:
        png = cairosvg.svg2png(bytestring=data, output_height=size)
        im = Image.open(io.BytesIO(png))
    return im.convert("RGBA")


def fit_square(im: Image.Image, size: int, margin: int = 0) -> Image.Image:
    """Crop RGBA art to its visible content and centre it in a transparent `size` square (aspect kept)."""
    im = im.convert("RGBA")
    bbox = im.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if bbox is None:
        raise ValueError("empty artwork (fully transparent)")
    im = im.crop(bbox)
    inner = size - 2 * margin
    s = inner / max(im.width, im.height)
    w, h = max(1, round(im.width * s)), max(1, round(im.height * s))
    im = im.resize((w, h), Image.LANCZOS)
    out = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    out.paste(im, ((size - w) // 2, (size - h) // 2))
    return out


def on_white(im: Image.Image) -> Image.Image:
    """Composite RGBA onto a white background; RGB result."""
    im = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, im).convert("RGB")


def load_art(path: str | Path, size: int = ART_SIZE, timeout: float = 10.0, margin: int = 0) -> Image.Image:
    """An SVG or bitmap file as RGBA content fitted into a `size` square (SVGs get `timeout` seconds)."""
    path = Path(path)
    if path.suffix.lower() == ".svg":
        with time_limit(timeout):
            im = rasterize_svg(path.read_bytes(), 2 * size)
    else:
        with Image.open(path) as f:
            im = f.convert("RGBA")
    return fit_square(im, size, margin)


def _colour(rng: np.random.Generator, light_only: bool) -> tuple[int, int, int]:
    dark = rng.random() < 0.5
    c = rng.random(3)
    if dark and not light_only:
        vals = 10 + 90 * c
    else:
        vals = 165 + 90 * c
    return tuple(int(v) for v in vals)


def _background(rng: np.random.Generator, light_only: bool) -> Image.Image:
    mode = rng.random()
    if mode < 0.3:
        return Image.new("RGB", (OUT_SIZE, OUT_SIZE), (255, 255, 255))
    if mode < 0.65:
        return Image.new("RGB", (OUT_SIZE, OUT_SIZE), _colour(rng, light_only))
    a = np.array(_colour(rng, light_only), dtype=np.float32)
    b = np.array(_colour(rng, light_only), dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:OUT_SIZE, 0:OUT_SIZE].astype(np.float32) / (OUT_SIZE - 1) - 0.5
    t = (xx * math.cos(theta) + yy * math.sin(theta)) / math.sqrt(0.5) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    return Image.fromarray((a * (1 - t) + b * t).round().astype(np.uint8), "RGB")


def render_instance(art: Image.Image, seed: int, light_only: bool = False) -> Image.Image:
    """One random 64x64 RGB rendering of RGBA `art`: scale, position, rotation, background, occlusion, noise.

    The random draws depend only on `seed`, so two artworks rendered with one seed share every parameter;
    `light_only` maps dark background colours to light ones (line art stays visible).
    """
    rng = np.random.default_rng(seed)
    canvas = _background(rng, light_only)
    scale = rng.uniform(0.55, 1.0)
    angle = rng.uniform(-25.0, 25.0)
    size = max(8, round(OUT_SIZE * scale))
    obj = art.resize((size, size), Image.LANCZOS).rotate(angle, Image.BICUBIC, expand=True)
    slack_x, slack_y = OUT_SIZE - obj.width, OUT_SIZE - obj.height
    x = int(rng.integers(min(0, slack_x), max(0, slack_x) + 1))
    y = int(rng.integers(min(0, slack_y), max(0, slack_y) + 1))
    canvas.paste(obj, (x, y), obj)
    if rng.random() < 0.5:  # occluder: a random rectangle covering up to ~15% of the image
        area = rng.uniform(0.03, 0.15) * OUT_SIZE * OUT_SIZE
        aspect = math.exp(rng.uniform(-0.7, 0.7))
        w = int(min(OUT_SIZE, max(2, round(math.sqrt(area * aspect)))))
        h = int(min(OUT_SIZE, max(2, round(area / w))))
        ox = int(rng.integers(0, OUT_SIZE - w + 1))
        oy = int(rng.integers(0, OUT_SIZE - h + 1))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        ImageDraw.Draw(canvas).rectangle([ox, oy, ox + w - 1, oy + h - 1], fill=fill)
    sigma = rng.uniform(0.0, 6.0)
    arr = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, sigma, (OUT_SIZE, OUT_SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")
