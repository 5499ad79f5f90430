"""Accuracy of a text-to-image model of the shapes dataset: generate one image per caption with
one of the project's samplers and read each back with :func:`ldm.data.shapes.check`.

Usage::

    python -m ldm.training.evaluate --config configs/demo/demo-txt2img.yaml \
        --ckpt models/demo/demo.safetensors --sampler ddim --steps 50 --scale 7.5 --split train [--edits 24]

``--edits N`` adds img2img (strength 0.3 with the image's own caption, the empty prompt and a
conflicting caption; 0.5 and 0.9 with a conflicting caption) and inpainting on N images each.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.registry import SAMPLER_NAMES, make_sampler

log = logging.getLogger(__name__)

#: default step counts (the issue's settings: DDIM 50, PLMS 50, DPM-Solver 20; 50 for the others)
DEFAULT_STEPS = {"dpm_solver": 20}


@torch.no_grad()
def generate(model, prompts: Sequence[str], sampler: str = "ddim", steps: int = 50, scale: float = 7.5,
             seed: int = 0, batch_size: int = 64, height: int = 64, width: int = 64) -> np.ndarray:
    """Images for ``prompts``: uint8 ``[N, H, W, 3]``. Image ``i`` uses the start noise of a CPU
    generator seeded ``seed + i`` (independent of the batch size)."""
    f = model.first_stage_model.downsample_factor
    shape = (model.channels, height // f, width // f)
    s = make_sampler(sampler, model)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        c = model.get_learned_conditioning(chunk)
        uc = model.get_learned_conditioning([""] * len(chunk)) if scale != 1.0 else None
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        z, _ = s.sample(S=steps, batch_size=len(chunk), shape=shape, conditioning=c, verbose=False,
                        unconditional_guidance_scale=scale, unconditional_conditioning=uc, generator=gens)
        x = model.decode_first_stage(z).clamp(-1, 1)
        out.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def evaluate(model, split: str = "train", sampler: str = "ddim", steps: int = 50, scale: float = 7.5,
             per_combo: int = 1, seed: int = 0, batch_size: int = 64, min_iou: Optional[float] = None) -> dict:
    """Agreement (fractions in [0, 1], keys of :func:`ldm.data.shapes.check`; ``iou`` the mean
    template IoU) over ``per_combo`` images of every combination of ``split`` (``train`` or
    ``heldout``). A shape counts when its template IoU is at least ``min_iou`` (default
    :data:`ldm.data.shapes.SHARP_IOU`)."""
    from ldm.data.shapes import HELDOUT_COMBOS, SHARP_IOU, TRAIN_COMBOS, agreement, caption

    combos = {"train": TRAIN_COMBOS, "heldout": HELDOUT_COMBOS}[split]
    prompts = [caption(c) for c in combos for _ in range(per_combo)]
    t = time.time()
    images = generate(model, prompts, sampler, steps, scale, seed, batch_size)
    min_iou = SHARP_IOU if min_iou is None else min_iou
    result = agreement(list(images), prompts, min_iou)
    result.update(n=len(prompts), seconds=round(time.time() - t, 1), split=split, sampler=sampler, steps=steps,
                  scale=scale, min_iou=min_iou)
    return result


def _pairs(n: int, seed: int) -> list:
    """``n`` (init combination, other training combination) pairs differing in all three words,
    drawn reproducibly from the training combinations."""
    from ldm.data.shapes import TRAIN_COMBOS

    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n:
        a, b = (TRAIN_COMBOS[i] for i in rng.choice(len(TRAIN_COMBOS), 2, replace=False))
        if all(x != y for x, y in zip(a, b)):
            pairs.append((a, b))
    return pairs


def evaluate_img2img(sd, strength: float, prompt: str = "other", n: int = 24, seed: int = 0,
                     steps: int = 50, scale: float = 7.5) -> dict:
    """img2img on ``n`` rendered training images, read back with :func:`ldm.data.shapes.classify`.

    :param sd: a :class:`ldm.generate.StableDiffusion`.
    :param prompt: ``"other"`` (a training caption differing in every word), ``"own"`` (the init
        image's caption) or ``"empty"``.
    :returns: fractions of outputs showing the init image's combination (``kept``), the other
        caption's (``followed``), and the init's combination with its shape box within 5 pixels
        (``kept_in_place``).
    """
    from PIL import Image

    from ldm.data.shapes import caption, classify, render

    kept = followed = in_place = 0
    pairs = _pairs(n, seed)
    for i, (a, b) in enumerate(pairs):
        init = render(a, seed * 1000 + i)[0]
        text = {"other": caption(b), "own": caption(a), "empty": ""}[prompt]
        out = sd.img2img(text, Image.fromarray(init), seeds=seed + i, strength=strength, steps=steps,
                         scale=scale).images[0]
        got, ref = classify(out), classify(init)
        combo = (got["shape_colour"], got["shape"], got["background"])
        kept += combo == tuple(a)
        followed += combo == tuple(b)
        in_place += combo == tuple(a) and got["box"] is not None and \
            float(np.abs(np.subtract(got["box"], ref["box"])).max()) <= 5
    return dict(task="img2img", strength=strength, prompt=prompt, n=n, kept=kept / n, followed=followed / n,
                kept_in_place=in_place / n)


def evaluate_inpaint(sd, n: int = 24, seed: int = 0, steps: int = 50, scale: float = 7.5) -> dict:
    """Mask the shape of ``n`` rendered training images (its box plus 4 pixels) and ask for another
    shape colour: the fraction whose shape takes the asked colour on the kept background
    (``recoloured``), and whether every unmasked pixel came back unchanged (``unmasked_exact``)."""
    from PIL import Image

    from ldm.data.shapes import COLOURS, caption, classify, render

    rng = np.random.default_rng(seed + 1)
    hits, exact = 0, True
    pairs = _pairs(n, seed)
    for i, (a, _) in enumerate(pairs):
        image, params = render(a, seed * 1000 + i)
        x0, y0, x1, y1 = params["box"]
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[max(0, int(y0) - 4):int(y1) + 5, max(0, int(x0) - 4):int(x1) + 5] = 255
        colour = str(rng.choice([c for c in COLOURS if c not in (a[0], a[2])]))
        out = np.asarray(sd.inpaint(caption((colour, a[1], a[2])), Image.fromarray(image), Image.fromarray(mask),
                                    seeds=seed + i, steps=steps, scale=scale).images[0])
        exact &= bool(np.array_equal(out[mask < 128], image[mask < 128]))
        got = classify(out)
        hits += (got["shape_colour"], got["background"]) == (colour, a[2])
    return dict(task="inpaint", n=n, recoloured=hits / n, unmasked_exact=exact)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description="Accuracy of a shapes text-to-image model (ldm.data.shapes.check).")
    p.add_argument("--config", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--sampler", choices=SAMPLER_NAMES, nargs="+", default=["ddim"])
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="steps, one per sampler (default 20 for dpm_solver, 50 for the others)")
    p.add_argument("--scale", type=float, nargs="+", default=[7.5])
    p.add_argument("--split", choices=("train", "heldout"), nargs="+", default=["train"])
    p.add_argument("--per-combo", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-iou", type=float, default=None,
                   help="least template IoU for a shape to count (default ldm.data.shapes.SHARP_IOU, 0.75; 0: any)")
    p.add_argument("--use-ema", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--edits", type=int, default=0, metavar="N",
                   help="also evaluate img2img (strength 0.3 and 0.9) and inpainting on N images each")
    opt = p.parse_args(argv)
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config

    use_ema = {"auto": None, "yes": True, "no": False}[opt.use_ema]
    model = load_model_from_config(OmegaConf.load(opt.config), opt.ckpt, use_ema=use_ema)
    if opt.steps and len(opt.steps) != len(opt.sampler):
        p.error(f"--steps takes one count per sampler: {len(opt.sampler)} sampler(s), {len(opt.steps)} count(s)")
    for i, sampler in enumerate(opt.sampler):
        steps = opt.steps[i] if opt.steps else DEFAULT_STEPS.get(sampler, 50)
        for split in opt.split:
            for scale in opt.scale:
                r = evaluate(model, split, sampler, steps, scale, opt.per_combo, opt.seed, min_iou=opt.min_iou)
                print(json.dumps(r), flush=True)
    if opt.edits:
        from ldm.generate import SAFETY_NOT_NEEDED, StableDiffusion

        sd = StableDiffusion(model, safety_status=SAFETY_NOT_NEEDED, progress=False, exact_batches=False)
        for strength, prompt in ((0.3, "own"), (0.3, "empty"), (0.3, "other"), (0.5, "other"), (0.9, "other")):
            print(json.dumps(evaluate_img2img(sd, strength, prompt, opt.edits, opt.seed)), flush=True)
        print(json.dumps(evaluate_inpaint(sd, opt.edits, opt.seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
