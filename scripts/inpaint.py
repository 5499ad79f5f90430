#!/usr/bin/env python
"""Inpainting: repaint the white part of a mask; every pixel outside it comes back unchanged.

Two modes:
  LDM (the original script): --indir DIR with NAME.png + NAME_mask.png pairs and the LDM
    inpainting_big model (models/ldm/inpainting_big/config.yaml and last.ckpt by default); no
    prompt, DDIM without guidance; writes OUTDIR/NAME.png (NAME-1.png, ... if that is taken).
  Text-guided: --init-img IMAGE --mask MASK --prompt TEXT with the SD inpainting checkpoint
    (--config configs/stable-diffusion/v1-inpainting-inference.yaml --ckpt sd-v1-5-inpainting.ckpt)
    or with any ordinary SD checkpoint (the txt2img defaults); writes OUTDIR/samples/00000.png, ...
    and a grid. Image k of the run uses seed + k (re-make one alone with --seed <its seed> --n_samples 1).
    OUTDIR/journal.jsonl lists every finished image: --resume finishes an interrupted run; torchrun
    shares the work over processes; --from-file takes a prompt list or a JSONL job file (see README,
    "Large batch runs"). The LDM mode keeps the original's names (OUTDIR/NAME.png) and has none of this.

Masks: white (gray >= 128) means repaint, black means keep; the mask must have the image's size.
Every image carries its generation parameters and the invisible watermark.

Examples:
  python scripts/inpaint.py --indir data/inpainting_examples --outdir outputs/inpainting_results
  python scripts/inpaint.py --init-img room.png --mask mask.png --prompt "a vase of flowers"
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm import cli  # noqa: E402  (light: no torch at import)

MASK_SUFFIX = "_mask.png"


def build_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("--indir", type=str, nargs="?", default=None,
                        help=f"LDM mode: folder of image/mask pairs (NAME.png and NAME{MASK_SUFFIX})")
    parser.add_argument("--init-img", dest="init_img", type=str, default=None,
                        help="text-guided mode: the image to inpaint")
    parser.add_argument("--mask", type=str, default=None,
                        help="text-guided mode: the mask, same size as the image; white = repaint")
    cli.add_prompt_args(parser, default="")
    cli.add_output_args(parser, "outputs/inpainting-samples")
    cli.add_batch_args(parser)
    cli.add_sampling_args(parser, "inpaint", steps_flags=("--steps", "--ddim_steps"), n_samples=1, n_iter=1)
    cli.add_model_args(parser, config=None, ckpt=None,
                       config_help=f"model config (default: {cli.LDM_INPAINT_CONFIG} with --indir, "
                                   f"{cli.SD_CONFIG} with --init-img)",
                       ckpt_help=f"checkpoint, .ckpt or .safetensors (default: {cli.LDM_INPAINT_CKPT} with --indir, "
                                 f"{cli.SD_CKPT} with --init-img)")
    cli.add_safety_args(parser)
    return parser


def find_pairs(indir: str) -> list:
    """``[(image path, mask path)]`` of ``NAME.png`` / ``NAME_mask.png`` in ``indir``, sorted by name."""
    folder = Path(indir)
    if not folder.is_dir():
        raise cli.UserInputError(f"--indir {folder}: folder not found; pass the folder with NAME.png and "
                                 f"NAME{MASK_SUFFIX} pairs")
    masks = sorted(folder.glob("*" + MASK_SUFFIX))
    if not masks:
        raise cli.UserInputError(f"--indir {folder} holds no *{MASK_SUFFIX} files; put NAME.png and "
                                 f"NAME{MASK_SUFFIX} pairs there")
    pairs = []
    for mask in masks:
        image = mask.with_name(mask.name[: -len(MASK_SUFFIX)] + ".png")
        if not image.is_file():
            raise cli.UserInputError(f"mask {mask} has no image {image.name} beside it; add it or remove the mask")
        pairs.append((image, mask))
    cli.log.info("found %d inputs in %s", len(pairs), folder)
    return pairs


def load_pair(image_path, mask_path):
    from ldm.image_io import load_image, load_mask

    image = load_image(image_path)
    return image, load_mask(mask_path, image.size)


def run(opt) -> None:
    # -- every check, before any model is loaded
    ldm_mode = opt.indir is not None
    if ldm_mode and (opt.init_img or opt.mask):
        raise cli.UserInputError("--indir (LDM mode) and --init-img/--mask (text-guided mode) both given; use one mode")
    if not ldm_mode and not (opt.init_img and opt.mask):
        raise cli.UserInputError("pass --indir DIR (LDM inpainting of NAME.png/NAME_mask.png pairs) or "
                                 "--init-img IMAGE --mask MASK --prompt TEXT (text-guided inpainting)")
    if ldm_mode:
        if opt.resume or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise cli.UserInputError("the LDM mode (--indir) writes OUTDIR/NAME.png per input in one process and "
                                     "keeps no journal: drop --resume and run it without torchrun")
        opt.config = opt.config or cli.LDM_INPAINT_CONFIG
        opt.ckpt = opt.ckpt or cli.LDM_INPAINT_CKPT
        plan = cli.plan_run(opt, "inpaint_ldm", expected_ckpt=cli.LDM_INPAINT_CKPT)
        inputs = [(image_path, *load_pair(image_path, mask_path)) for image_path, mask_path in find_pairs(opt.indir)]
        if opt.prompt or opt.negative_prompt or opt.from_file:
            cli.log.warning("the LDM inpainting model takes no text: --prompt/--negative_prompt/--from-file "
                            "are ignored")
        return inpaint_folder(opt, plan, inputs)
    opt.config = opt.config or cli.SD_CONFIG
    opt.ckpt = opt.ckpt or cli.SD_CKPT
    plan = cli.plan_run(opt, "inpaint")
    image, mask = load_pair(opt.init_img, opt.mask)
    from ldm.generate.inputs import binary_mask

    repaint = binary_mask(mask)  # what the pipeline repaints: its hash goes into the settings
    mask_digest = f"{repaint.shape[1]}x{repaint.shape[0]}:{hashlib.sha256(repaint.tobytes()).hexdigest()}"
    # prompts or a JSONL job file; torchrun's processes; the journal
    job = cli.plan_batch(opt, plan, "inpaint", sized=False,
                         extra={"init_image": cli.image_digest(image), "mask": mask_digest})

    # -- the run
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan, job)
    writer = ImageWriter(plan.outdir, save_samples=not opt.skip_save, save_grid=not opt.skip_grid)

    def render(items):  # one batch of work items with equal settings (ldm.batch.items.WorkItem)
        prompts, seeds, keywords = cli.batch_call(items)
        return sd.inpaint(prompts, image, mask, seeds, **keywords)

    cli.run_batch(job, render, writer)


def inpaint_folder(opt, plan, inputs) -> None:
    """The LDM mode: each input pair once, written as OUTDIR/NAME.png (the original's layout; no
    journal: names come from the inputs, not from item indices)."""
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan)
    writer = ImageWriter(plan.outdir, sample_dir=None, save_grid=False)
    for k, (image_path, image, mask) in enumerate(inputs):
        result = sd.inpaint_ldm(image, mask, opt.seed + k, steps=opt.steps, sampler=plan.sampler, eta=plan.eta)
        path = writer.write(result.images[0], result.records[0], plan.outdir, name=Path(image_path).name)
        cli.report_saved([path], result.records)
    cli.log.info("your results are in %s", plan.outdir)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
