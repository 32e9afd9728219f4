"""Bring your own images: write a tiny PNG-by-class folder and train on it with ``image-folder``.

    python docs/examples/png_folder.py /tmp/shapes              # writes /tmp/shapes/<class>/*.png, runs
    python docs/examples/png_folder.py /tmp/shapes --rounds 3   # extra arguments go to `ktl simulate`

The folder is what the built-in ``image-folder`` data set reads (docs/extending.md): one subfolder per
class, named after it, holding PNG files. Here the classes are four drawn shapes; with your own data,
point ``--data.path`` at your folder and skip the writing. The class names in the run's summary.json
come from the subfolder names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ktl.cli import main as ktl_main

Box = tuple[float, float, float, float]


def _circle(draw: ImageDraw.ImageDraw, box: Box) -> None:
    draw.ellipse(box, fill=255)


def _square(draw: ImageDraw.ImageDraw, box: Box) -> None:
    draw.rectangle(box, fill=255)


def _triangle(draw: ImageDraw.ImageDraw, box: Box) -> None:
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)


def _cross(draw: ImageDraw.ImageDraw, box: Box) -> None:
    x0, y0, x1, y1 = box
    draw.line([(x0, y0), (x1, y1)], fill=255, width=3)
    draw.line([(x0, y1), (x1, y0)], fill=255, width=3)


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, Box], None]] = {
    "circle": _circle,
    "cross": _cross,
    "square": _square,
    "triangle": _triangle,
}


def write_shapes(root: Path, *, per_class: int = 40, size: int = 28, seed: int = 0) -> list[str]:
    """Write ``per_class`` grayscale ``size``×``size`` PNGs of each shape (random place, size and noise)
    into ``root/<shape>/``; returns the class names."""
    rng = np.random.default_rng(seed)
    for name, draw_shape in SHAPES.items():
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = rng.uniform(0.45, 0.8) * size
            x0, y0 = rng.uniform(1, size - side - 1, size=2)
            image = Image.new("L", (size, size), 0)
            draw_shape(ImageDraw.Draw(image), (x0, y0, x0 + side, y0 + side))
            noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 12, size=(size, size))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return sorted(SHAPES)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        sys.stderr.write("usage: png_folder.py FOLDER [ktl simulate options]\n")
        return 2
    root, extra = Path(args[0]), args[1:]
    write_shapes(root)
    return ktl_main(
        ["simulate", "--preset", "smoke", "--data.dataset", "image-folder", "--data.path", str(root), *extra]
    )


if __name__ == "__main__":
    sys.exit(main())
