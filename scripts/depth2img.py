#!/usr/bin/env python
"""Re-imagine an image guided by a text prompt while keeping its depth, with the SD 2 depth model.

MiDaS (DPT-Hybrid, whose weights are in the checkpoint) estimates the init image's depth; the model
is conditioned on that depth map and the prompt, and, as img2img, the init image is encoded, noised
to the level --strength gives (default 0.9, the reference app's) and denoised over the last
int(strength * steps) steps: the result keeps the picture's depth layout, and with a lower strength
more of its colours. --depth-map supplies the depth instead: a gray image of any size (colour is made
gray, 16-bit files are read at 8 bits) whose brightness is the nearness of each pixel (white = near,
MiDaS's convention); only its shape counts, since it is resized to the latent size (bicubic) and
mapped to [-1, 1] by its own minimum and maximum, as MiDaS's estimate is.

The init image (any format and colour mode PIL reads) is scaled down to sides that are multiples of
64, as the reference app did (it says so when it resizes). Every sampler works.

Writes OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png (nothing is overwritten), each with
its generation parameters (incl. "Denoising strength" and "Depth") and the invisible watermark.
Image k of the run uses seed + k. OUTDIR/journal.jsonl lists every finished image: --resume
finishes an interrupted run; torchrun shares the work over processes; --from-file takes a prompt
list or a JSONL job file (see README, "Large batch runs").

Example:
  python scripts/depth2img.py --init-img room.jpg --prompt "a cozy wooden cabin interior" --strength 0.8 \\
      --config configs/stable-diffusion/v2-midas-inference.yaml --ckpt 512-depth-ema.ckpt
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm import cli  # noqa: E402  (light: no torch at import)
from ldm.families import get_family  # noqa: E402

FAMILY = get_family("sd-v2-depth")
RESIZE_MULTIPLE = 64  # what the reference app rounded init images down to


def build_parser():
    parser = cli.make_parser(__doc__)
    cli.add_prompt_args(parser)
    parser.add_argument("--init-img", dest="init_img", type=str, nargs="?", default=None,
                        help="path to the input image")
    parser.add_argument("--depth-map", dest="depth_map", type=str, default=None,
                        help="a gray image (any size; white = near) to use as the depth instead of "
                             "MiDaS's estimate; it is resized to the latent size and normalised to [-1, 1] by its "
                             "minimum and maximum")
    parser.add_argument("--strength", type=float, default=None,
                        help="how much of the init image is replaced, in [0, 1]; the depth is kept at any strength "
                             f"(default: the model family's, {FAMILY.strength})")
    cli.add_output_args(parser, "outputs/depth2img-samples")
    cli.add_batch_args(parser)
    cli.add_sampling_args(parser, "depth2img", steps_flags=("--steps", "--ddim_steps"), n_samples=1, n_iter=1, seed=0,
                          family=FAMILY.name)
    cli.add_model_args(parser, config=FAMILY.config, ckpt=FAMILY.checkpoint)
    cli.add_safety_args(parser)
    return parser


def run(opt) -> None:
    # -- every check, before any model is loaded
    from ldm.generate.inputs import check_strength

    cli.check_init_image(opt)
    if opt.strength is not None:
        check_strength(opt.strength, "--strength")
    plan = cli.plan_run(opt, "depth2img", expected_ckpt=FAMILY.checkpoint)
    if opt.strength is None:
        opt.strength = plan.spec.family.strength
    from ldm.models.diffusion.sampling import start_step_for_strength

    if opt.strength > 0:
        start_step_for_strength(opt.steps, opt.strength)  # strength * steps must run at least one step
    from ldm.image_io import load_image, resize_to_multiple

    image = resize_to_multiple(load_image(opt.init_img), RESIZE_MULTIPLE)  # logs when it resizes
    depth_map, depth = None, "MiDaS"
    if opt.depth_map:
        from ldm.generate.depth import depth_map_tensor

        try:  # read as the init image is (16-bit files scaled to 8 bits), then gray
            depth_map = depth_map_tensor(load_image(opt.depth_map))
        except cli.UserInputError as exc:
            raise cli.UserInputError(f"--depth-map: {exc}") from None
        depth = f"{depth_map.shape[-1]}x{depth_map.shape[-2]}:{hashlib.sha256(depth_map.numpy().tobytes()).hexdigest()}"

    def check_job(settings):  # a JSONL line's steps must also run at least one step at this strength
        if opt.strength > 0:
            start_step_for_strength(settings["steps"], opt.strength)

    job = cli.plan_batch(opt, plan, "depth2img", sized=False, check=check_job,
                         extra={"init_image": cli.image_digest(image), "strength": opt.strength, "depth": depth})

    # -- the run
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan, job)
    writer = ImageWriter(plan.outdir, save_samples=not opt.skip_save, save_grid=not opt.skip_grid)

    def render(items):  # one batch of work items with equal settings (ldm.batch.items.WorkItem)
        prompts, seeds, keywords = cli.batch_call(items)
        return sd.depth2img(prompts, image, seeds, strength=opt.strength, depth_map=depth_map, **keywords)

    cli.run_batch(job, render, writer)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
