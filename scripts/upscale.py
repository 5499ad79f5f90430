#!/usr/bin/env python
"""Upscale an image 4x, guided by a text prompt, with the Stable Diffusion 2 x4 upscaler.

The input image (any format and colour mode PIL reads) is noise-augmented to --noise_level (0..350;
more noise keeps less of the input's fine detail) and conditions the model together with the
prompt; the result is 4x the input's width and height. The model works at the input's size, so
inputs of a few hundred pixels a side are practical; for a larger picture upscale it in tiles of
256x256 or less. Outputs over 1024 pixels a side are decoded in tiles (--vae_tile). Every sampler
works.

Writes OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png (nothing is overwritten), each with
its generation parameters (incl. "Noise level") and the invisible watermark. Image k of the run
uses seed + k. OUTDIR/journal.jsonl lists every finished image: --resume finishes an interrupted
run; torchrun shares the work over processes; --from-file takes a prompt list or a JSONL job file
(see README, "Large batch runs").

Examples:
  python scripts/upscale.py --init-img low.png --prompt "a professional photograph of a cat" \\
      --config configs/stable-diffusion/x4-upscaling.yaml --ckpt x4-upscaler-ema.ckpt
  torchrun --standalone --nproc_per_node 2 scripts/upscale.py --init-img low.png --from-file prompts.txt --resume
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm import cli  # noqa: E402  (light: no torch at import)
from ldm.families import get_family  # noqa: E402

FAMILY = get_family("sd-x4-upscaler")
DEFAULT_PROMPT = "a high quality professional photograph"  # the reference app's
LARGE_INPUT = 512  # input side above which the run says how to tile


def build_parser():
    parser = cli.make_parser(__doc__)
    cli.add_prompt_args(parser, default=DEFAULT_PROMPT)
    parser.add_argument("--init-img", dest="init_img", type=str, nargs="?", default=None,
                        help="path to the low-resolution input image")
    parser.add_argument("--noise_level", type=int, default=20,
                        help="noise added to the input before it conditions the model, 0..350 (the reference app's "
                             "default: 20)")
    cli.add_output_args(parser, "outputs/upscale-samples")
    cli.add_batch_args(parser)
    cli.add_sampling_args(parser, "upscale", steps_flags=("--steps", "--ddim_steps"), n_samples=1, n_iter=1, seed=0,
                          family=FAMILY.name)
    parser.add_argument("--vae_tile", type=int, default=None,
                        help="decode the output in tiles of this many latent positions (4x as many pixels); 0 "
                             "decodes in one piece (default: tiles of 128 when an output side is over 1024 pixels)")
    cli.add_model_args(parser, config=FAMILY.config, ckpt=FAMILY.checkpoint)
    cli.add_safety_args(parser)
    return parser


def run(opt) -> None:
    # -- every check, before any model is loaded
    from ldm.generate.upscale import check_noise_level, check_tile

    cli.check_init_image(opt)
    check_noise_level(opt.noise_level, "--noise_level")
    check_tile(opt.vae_tile, "--vae_tile")
    plan = cli.plan_run(opt, "upscale", expected_ckpt=FAMILY.checkpoint)
    from ldm.image_io import load_image

    image = load_image(opt.init_img)
    if max(image.size) > LARGE_INPUT:
        cli.log.warning("the input is %dx%d: the model works at that size and makes %dx%d; if it runs out of memory, "
                        "upscale the image in tiles of 256x256 or less", *image.size, 4 * image.width,
                        4 * image.height)
    # prompts or a JSONL job file; torchrun's processes; the journal (--noise_level, --vae_tile: in the settings)
    job = cli.plan_batch(opt, plan, "upscale", sized=False, extra={"init_image": cli.image_digest(image)})

    # -- the run
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan, job)
    writer = ImageWriter(plan.outdir, save_samples=not opt.skip_save, save_grid=not opt.skip_grid)

    def render(items):  # one batch of work items with equal settings (ldm.batch.items.WorkItem)
        prompts, seeds, keywords = cli.batch_call(items)
        return sd.upscale(prompts, image, seeds, noise_level=opt.noise_level, tile=opt.vae_tile, **keywords)

    cli.run_batch(job, render, writer)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
