#!/usr/bin/env python
"""Upscale an image 4x with the latent diffusion super-resolution model (bsr_sr).

The reference's notebook flow (notebook_helpers.py of CompVis/latent-diffusion): the
low-resolution image (any format and colour mode PIL reads, each side at least 8 pixels)
conditions the model as it is, DDIM with eta 1 (--ddim_eta; 0 is deterministic), 100 steps, no
guidance, the EMA weights. From 32 pixels a side (128 output pixels) the model runs patch-wise as
the notebook does (--split auto): overlapping crops of --patch_size input pixels every
--patch_stride, blended with border-distance weights, in the UNet and in the decoder, so any size
fits in bounded memory (--split off runs in one piece; on forces the crops).

Writes OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png (nothing is overwritten), each with
its seed and settings (incl. "Input size" and "Patches"). Image k of the run uses seed + k.
OUTDIR/journal.jsonl lists every finished image: --resume finishes an interrupted run; torchrun
shares the work over processes (see README, "Large batch runs"). The model takes no text, so there
is no --from-file.

Example:
  python scripts/superres.py --init-img low.png --ckpt models/ldm/bsr_sr/model.ckpt
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm import cli  # noqa: E402  (light: no torch at import)
from ldm.families import get_family  # noqa: E402

FAMILY = get_family("ldm-superres")
LARGE_INPUT = 1024  # input side above which the run says it will take long


def build_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("--init-img", dest="init_img", type=str, nargs="?", default=None,
                        help="path to the low-resolution input image")
    parser.add_argument("--split", choices=("auto", "on", "off"), default="auto",
                        help="patch-wise sampling and decoding: auto (the notebook's rule: from 32 input pixels a "
                             "side), on or off (one piece)")
    parser.add_argument("--patch_size", type=int, default=128,
                        help="crop side in input pixels (= latent positions; 4x in the output), a multiple of 8 "
                             "(the notebook's: 128)")
    parser.add_argument("--patch_stride", type=int, default=64,
                        help="step between crops in input pixels, at most --patch_size (the notebook's: 64)")
    cli.add_output_args(parser, "outputs/superres-samples")
    cli.add_batch_args(parser)
    cli.add_sampling_args(parser, "superres", steps_flags=("--steps", "--ddim_steps", "--custom_steps"), n_samples=1,
                          n_iter=1, seed=0, family=FAMILY.name)
    parser.set_defaults(ddim_eta=None)
    for action in parser._actions:
        if action.dest == "ddim_eta":
            action.help = ("DDIM eta (default: 1.0, the notebook's; 0 is deterministic); with --sampler euler_a its "
                           "noise amount")
        if action.dest == "scale":
            action.help = "guidance scale: the model has no guidance, only 1 is accepted (default: 1)"
    cli.add_model_args(parser, config=FAMILY.config, ckpt=FAMILY.checkpoint)
    cli.add_safety_args(parser)
    return parser


def run(opt) -> None:
    # -- every check, before any model is loaded
    from ldm.generate.superres import check_patches

    cli.check_init_image(opt)
    if opt.scale is not None and opt.scale != 1.0:
        raise cli.UserInputError(f"--scale {opt.scale}: the super-resolution model has no guidance; drop --scale")
    check_patches(opt.patch_size, opt.patch_stride, names=("--patch_size", "--patch_stride"))
    eta_flag, opt.ddim_eta = opt.ddim_eta, opt.ddim_eta or 0.0  # 0 is checked here, None means the notebook's 1
    plan = cli.plan_run(opt, "superres", expected_ckpt=FAMILY.checkpoint)
    from ldm.models.diffusion.registry import sampler_info

    plan.eta = (eta_flag if eta_flag is not None else 1.0) if sampler_info(plan.sampler).default_eta is not None \
        else None
    from ldm.image_io import load_image

    image = load_image(opt.init_img)
    if max(image.size) > LARGE_INPUT:
        cli.log.warning("the input is %dx%d (output %dx%d): it runs patch by patch, which takes a while",
                        *image.size, 4 * image.width, 4 * image.height)
    # no prompts: --n_samples images per iteration; torchrun's processes; the journal (--split, --patch_*: settings)
    job = cli.plan_batch(opt, plan, "superres", sized=False, data=[[""] * opt.n_samples],
                         extra={"init_image": cli.image_digest(image)})

    # -- the run
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan, job)
    writer = ImageWriter(plan.outdir, save_samples=not opt.skip_save, save_grid=not opt.skip_grid)

    def render(items):  # one batch of work items with equal settings (ldm.batch.items.WorkItem)
        s = items[0]
        return sd.superres(image, [i.seed for i in items], steps=s.steps, sampler=s.sampler, eta=s.eta,
                           split=opt.split, patch=opt.patch_size, stride=opt.patch_stride)

    cli.run_batch(job, render, writer)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
