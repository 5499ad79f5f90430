#!/usr/bin/env python
"""Make variations of an image with Stable unCLIP 2.1 (H or L), optionally guided by a prompt.

For unCLIP-L pass --config configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml and put
Karlo's ViT-L-14_stats.th at the config's clip_stats_path (checkpoints/karlo_models/, relative to
the working directory); unCLIP-H needs no extra file.

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
uses seed + k. OUTDIR/journal.jsonl lists every finished image: --resume finishes an interrupted
run; torchrun shares the work over processes; --from-file takes a prompt list or a JSONL job file
(see README, "Large batch runs").

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
    cli.add_batch_args(parser)
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
    from ldm.image_io import load_image

    image = load_image(opt.init_img)
    # prompts or a JSONL job file; torchrun's processes; the journal (--noise_level: in the settings)
    job = cli.plan_batch(opt, plan, "variations", extra={"init_image": cli.image_digest(image)})

    # -- the run
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan, job)
    writer = ImageWriter(plan.outdir, save_samples=not opt.skip_save, save_grid=not opt.skip_grid)

    def render(items):  # one batch of work items with equal settings (ldm.batch.items.WorkItem)
        prompts, seeds, keywords = cli.batch_call(items, sized=True)
        return sd.variations(image, prompts, seeds, noise_level=opt.noise_level, **keywords)

    cli.run_batch(job, render, writer)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
