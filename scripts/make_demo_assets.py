#!/usr/bin/env python
"""Make the README's example images of the demo model by running the scripts as a user would.

Writes into assets/demo/ (refusing to replace files there unless --force):
  init.png, mask.png         the img2img / inpainting inputs (drawn by ldm.data.shapes)
  txt2img.png                six prompts, scripts/txt2img.py, DDIM 50, seeds 42..47
  img2img.png                init | strength 0.3, empty prompt | strength 0.9, another prompt
  inpaint.png                init | mask | the masked square repainted yellow
Every panel is shown at 3x (nearest neighbour): the model draws 64x64 images.

    python scripts/make_demo_assets.py [--force]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.data.shapes import caption, render  # noqa: E402

CONFIG = REPO / "configs" / "demo" / "demo-txt2img.yaml"
CKPT = REPO / "models" / "demo" / "demo.safetensors"
OUT = REPO / "assets" / "demo"
ZOOM = 3
GAP = 6
PROMPTS = [caption(c) for c in [("red", "circle", "blue"), ("yellow", "triangle", "purple"),
                                ("white", "square", "black"), ("orange", "circle", "green"),
                                ("green", "triangle", "white"), ("purple", "square", "yellow")]]
INIT = ("red", "square", "blue")
IMG2IMG_PROMPT = caption(("green", "circle", "orange"))
INPAINT_PROMPT = caption(("yellow", "square", "blue"))


def script(name: str, *args) -> None:
    cmd = [sys.executable, str(REPO / "scripts" / name), "--config", str(CONFIG), "--ckpt", str(CKPT),
           *map(str, args)]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def strip(images: list) -> Image.Image:
    """Images side by side, each enlarged ZOOM times, GAP white pixels apart."""
    tiles = [np.asarray(Image.open(p).convert("RGB") if isinstance(p, Path) else p) for p in images]
    h = max(t.shape[0] for t in tiles) * ZOOM
    canvas = Image.new("RGB", (sum(t.shape[1] * ZOOM for t in tiles) + GAP * (len(tiles) - 1), h), "white")
    x = 0
    for t in tiles:
        canvas.paste(Image.fromarray(t).resize((t.shape[1] * ZOOM, t.shape[0] * ZOOM), Image.Resampling.NEAREST),
                     (x, 0))
        x += t.shape[1] * ZOOM + GAP
    return canvas


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="replace the files in assets/demo/")
    opt = p.parse_args(argv)
    names = ["init.png", "mask.png", "txt2img.png", "img2img.png", "inpaint.png"]
    taken = [n for n in names if (OUT / n).exists()]
    if taken and not opt.force:
        print(f"error: assets/demo/ already has {', '.join(taken)}; pass --force to replace them", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)

    image, params = render(INIT, 3)
    x0, y0, x1, y1 = params["box"]
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[max(0, int(y0) - 4):int(y1) + 5, max(0, int(x0) - 4):int(x1) + 5] = 255
    Image.fromarray(image).save(OUT / "init.png")
    Image.fromarray(mask).save(OUT / "mask.png")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        script("txt2img.py", "--from-file", tmp / "prompts.txt", "--n_samples", 1, "--n_iter", 1, "--outdir", tmp / "t2i")
        txt2img = sorted((tmp / "t2i" / "samples").glob("*.png"))
        script("img2img.py", "--init-img", OUT / "init.png", "--prompt", "", "--strength", 0.3, "--n_samples", 1,
               "--outdir", tmp / "i2i-low")
        script("img2img.py", "--init-img", OUT / "init.png", "--prompt", IMG2IMG_PROMPT, "--strength", 0.9,
               "--n_samples", 1, "--outdir", tmp / "i2i-high")
        script("inpaint.py", "--init-img", OUT / "init.png", "--mask", OUT / "mask.png", "--prompt", INPAINT_PROMPT,
               "--outdir", tmp / "inpaint")
        first = lambda folder: sorted((tmp / folder / "samples").glob("*.png"))[0]  # noqa: E731
        strip(txt2img).save(OUT / "txt2img.png")
        strip([OUT / "init.png", first("i2i-low"), first("i2i-high")]).save(OUT / "img2img.png")
        strip([OUT / "init.png", OUT / "mask.png", first("inpaint")]).save(OUT / "inpaint.png")
    print(f"wrote {', '.join(names)} in {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
