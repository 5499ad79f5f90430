#!/usr/bin/env python
"""Make variations of an input image guided by a text prompt (SDEdit) with a Stable Diffusion checkpoint.

The init image (any format and colour mode PIL reads) is scaled down to sides that are multiples
of 32, as the original script did (it says so when it resizes); --keep_size only rounds down to a
multiple of 8, and --W/--H resize it to exactly that size. It is encoded, noised to the level
--strength gives and denoised over the last int(strength * steps) steps: 1.0 ignores its
content, 0.0 returns it (re-encoded). Every sampler works.

Writes OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png (nothing is overwritten), each with
its generation parameters (incl. "Denoising strength") and the invisible watermark. Image k of
the run uses seed + k: re-make one alone with --seed <its seed> --n_samples 1 --n_iter 1.
OUTDIR/journal.jsonl lists every finished image: --resume finishes an interrupted run; torchrun
shares the work over processes (see README, "Large batch runs").

Example:
  python scripts/img2img.py --prompt "a fantasy landscape, trending on artstation" --init-img sketch.jpg --strength 0.8
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm import cli  # noqa: E402  (light: no torch at import)

RESIZE_MULTIPLE = 32  # what the original img2img.py rounded init images down to


def build_parser():
    parser = cli.make_parser(__doc__)
    cli.add_prompt_args(parser)
    parser.add_argument("--init-img", dest="init_img", type=str, nargs="?", default=None,
                        help="path to the input image")
    cli.add_output_args(parser, "outputs/img2img-samples")
    cli.add_batch_args(parser)
    cli.add_sampling_args(parser, "img2img", steps_flags=("--ddim_steps", "--steps"), n_samples=2, n_iter=1)
    parser.add_argument("--strength", type=float, default=None,
                        help="how much of the init image is replaced, in [0, 1]: 1.0 destroys all of its "
                             "information (default: the model family's, 0.75 for SD v1, 0.8 for SD 2)")
    parser.add_argument("--keep_size", action="store_true",
                        help=f"round the init image's size down to a multiple of 8 instead of {RESIZE_MULTIPLE}")
    cli.add_size_args(parser, default=None, help_extra=" to resize the init image to (a multiple of 8; "
                                                       "default: the init image's own size, rounded down)")
    cli.add_model_args(parser)
    cli.add_safety_args(parser)
    return parser


def load_init_image(opt, factor: int):
    """The init image, resized as the options say (and logged when it is)."""
    from PIL import Image

    from ldm.image_io import load_image, resize_to_multiple

    image = load_image(opt.init_img)
    if opt.W is not None or opt.H is not None:
        size = (opt.W or image.width, opt.H or image.height)
        if size != image.size:
            cli.log.info("resizing the init image from %dx%d to %dx%d (--W/--H)", *image.size, *size)
            image = image.resize(size, resample=Image.Resampling.LANCZOS)
    return resize_to_multiple(image, factor if opt.keep_size else max(RESIZE_MULTIPLE, factor))


def run(opt) -> None:
    # -- every check, before any model is loaded
    cli.check_init_image(opt)
    from ldm.generate.inputs import check_strength

    if opt.strength is not None:
        check_strength(opt.strength, "--strength")
    plan = cli.plan_run(opt, "img2img")
    if opt.strength is None:
        opt.strength = plan.spec.family.strength
    from ldm.models.diffusion.sampling import start_step_for_strength

    if opt.strength > 0:
        start_step_for_strength(opt.steps, opt.strength)  # strength * steps must run at least one step
    init_image = load_init_image(opt, plan.spec.geometry.factor)

    def check_job(settings):  # a JSONL line's steps must also run at least one step at this strength
        if opt.strength > 0:
            start_step_for_strength(settings["steps"], opt.strength)

    job = cli.plan_batch(opt, plan, "img2img", sized=False, check=check_job,
                         extra={"init_image": cli.image_digest(init_image), "strength": opt.strength})

    # -- the run
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan, job)
    writer = ImageWriter(plan.outdir, save_samples=not opt.skip_save, save_grid=not opt.skip_grid)

    def render(items):  # one batch of work items with equal settings (ldm.batch.items.WorkItem)
        prompts, seeds, keywords = cli.batch_call(items)
        return sd.img2img(prompts, init_image, seeds, strength=opt.strength, **keywords)

    cli.run_batch(job, render, writer)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
