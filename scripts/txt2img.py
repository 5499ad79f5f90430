#!/usr/bin/env python
"""Make images from a text prompt with a Stable Diffusion checkpoint.

Writes OUTDIR/samples/00000.png, 00001.png, ... (numbers continue after existing files; nothing is
overwritten) and OUTDIR/grid-0000.png with every image of the run. Each PNG carries its generation
parameters (AUTOMATIC1111 "parameters" text: prompt, negative prompt, steps, sampler, CFG scale,
seed, size, model hash, ...) and the invisible watermark.

Batch runs: OUTDIR/journal.jsonl lists every finished image; --resume finishes an interrupted run.
--from-file also takes a JSONL job file (one JSON object per line with its own settings). Started
by torchrun, the processes share the work and write the same folder one process would.

Seeds: image k of a run (counted over all iterations and prompts) uses seed + k; the log and the
PNG name it. To make one image of a batch again on its own, pass its prompt with
--seed <that seed> --n_samples 1 --n_iter 1 (and the same size, steps, sampler and scale).
With --fixed_code every iteration repeats the first one's seeds (image k of each batch: seed + k).

Examples:
  python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --plms
  python scripts/txt2img.py --from-file prompts.txt --sampler dpmpp_2m_karras --ddim_steps 25
  torchrun --standalone --nproc_per_node 4 scripts/txt2img.py --from-file jobs.jsonl --outdir runs/eval --resume
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm import cli  # noqa: E402  (light: no torch at import)


def build_parser():
    parser = cli.make_parser(__doc__)
    cli.add_prompt_args(parser)
    cli.add_output_args(parser, "outputs/txt2img-samples")
    cli.add_batch_args(parser)
    cli.add_sampling_args(parser, "txt2img", steps_flags=("--ddim_steps", "--steps"), n_samples=3, n_iter=2)
    parser.add_argument("--laion400m", action="store_true",
                        help=f"use the LAION-400M LDM model ({cli.LAION_CONFIG}, {cli.LAION_CKPT}) with its "
                             "defaults: 256x256, scale 5.0, DDIM 50 steps")
    parser.add_argument("--bert_vocab", type=str, default=None,
                        help="the bert-base-uncased vocab.txt of the LDM text-to-image models (not in their "
                             f"checkpoints; default: {Path(cli.LAION_CKPT).parent / 'vocab.txt'})")
    cli.add_size_args(parser, default=None, help_extra=" (default: the model's, 512 for SD v1; a config's "
                                                       "demo.height/width)")
    cli.add_model_args(parser)
    cli.add_safety_args(parser)
    return parser


def run(opt) -> None:
    # -- every check, before any model is loaded
    if opt.laion400m:
        cli.check_laion400m(opt)
    plan = cli.plan_run(opt, "txt2img", fill_size=True)
    cli.check_bert_vocab(opt, plan.config)
    job = cli.plan_batch(opt, plan, "txt2img")  # prompts or a JSONL job file; torchrun's processes; the journal

    # -- the run
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan, job)
    writer = ImageWriter(plan.outdir, save_samples=not opt.skip_save, save_grid=not opt.skip_grid)

    def render(items):  # one batch of work items with equal settings (ldm.batch.items.WorkItem)
        prompts, seeds, keywords = cli.batch_call(items, sized=True)
        return sd.txt2img(prompts, seeds, **keywords)

    cli.run_batch(job, render, writer)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
