#!/usr/bin/env python
"""Make variations of an image with Stable unCLIP 2.1 (SD 2.1 unCLIP-H), optionally guided by a prompt.

A separate script, not an img2img mode: img2img encodes the init image into the latent and
denoises part of the way, while unCLIP starts from pure noise and is conditioned on the image's CLIP
embedding (a vector added to the UNet's time embedding), so none of img2img's flags (--strength,
resizing to the init image's size) apply, and the model runs nothing else.

The init image (any size, format and colour mode PIL reads) is resized to 224x224 for the CLIP
image tower; its embedding is noise-augmented to --noise_level (0..999; 0 keeps it as it is, more
noise keeps less of the image) and conditions the model together with --prompt (may be empty).
Outputs are --W x --H (default 768x768). Every sampler works; the default guidance scale is 10.

Writes OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png (nothing is overwritten), each with
its generation parameters (incl. "Noise level") and the invisible watermark. Image k of the run
uses seed + k.

Example:
  python scripts/variations.py --init-img photo.jpg --prompt "" --noise_level 0 \\
      --config configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml --ckpt sd21-unclip-h.ckpt
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm import cli  # noqa: E402  (light: no torch at import)
from ldm.families import get_family  # noqa: E402

FAMILY = get_family("sd-v2-unclip")


def build_parser():
    parser = cli.make_parser(__doc__)
    cli.add_prompt_args(parser, default="")
    parser.add_argument("--init-img", dest="init_img", type=str, nargs="?", default=None,
                        help="path to the image to make variations of")
    parser.add_argument("--noise_level", type=int, default=0,
                        help="noise added to the image's CLIP embedding, 0..999 (default 0: none)")
    cli.add_output_args(parser, "outputs/variations-samples")
    cli.add_sampling_args(parser, "variations", steps_flags=("--steps", "--ddim_steps"), n_samples=2, n_iter=1,
                          family=FAMILY.name)
    cli.add_size_args(parser, default=None, help_extra=f" of the outputs (default: the model family's, "
                                                       f"{FAMILY.size[1]}x{FAMILY.size[0]})")
    cli.add_model_args(parser, config=FAMILY.config, ckpt=FAMILY.checkpoint)
    cli.add_safety_args(parser)
    return parser


def run(opt) -> None:
    # -- every check, before any model is loaded
    from ldm.generate.variations import check_variation_noise_level

    cli.check_init_image(opt)
    check_variation_noise_level(opt.noise_level, "--noise_level")
    plan = cli.plan_run(opt, "variations", expected_ckpt=FAMILY.checkpoint, fill_size=True)
    prompts = cli.read_prompts(opt)
    from ldm.image_io import load_image

    image = load_image(opt.init_img)
    data = cli.prompt_batches(opt, prompts)

    # -- the run
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan)
    writer = ImageWriter(plan.outdir, save_samples=not opt.skip_save, save_grid=not opt.skip_grid)

    def make_batch(batch_prompts, first_seed):
        return sd.variations(image, batch_prompts, first_seed, noise_level=opt.noise_level,
                             negative_prompt=opt.negative_prompt, steps=opt.steps, sampler=plan.sampler,
                             scale=opt.scale, eta=plan.eta, width=opt.W, height=opt.H)

    cli.generate_all(opt, data, make_batch, writer)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
