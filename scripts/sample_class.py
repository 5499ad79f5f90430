#!/usr/bin/env python
"""Sample ImageNet classes with the class-conditional latent diffusion model (cin256-v2).

The reference notebook's flow (scripts/latent_imagenet_diffusion.ipynb of CompVis/latent-diffusion):
each class goes through the model's class embedding, classifier-free guidance runs against the
null class 1000 (--scale; 1 turns it off), DDIM 20 steps, 256x256 pixels. Classes are indices
0..999 or names of ldm/data/imagenet_classes.txt ("Yorkshire terrier", "agaric"); a name must
match exactly one class. The older cin256 (VQ-f8) model has no null class and samples with
--scale 1 (its default).

Writes OUTDIR/samples/00000.png, ... (--n_samples per class and iteration) and OUTDIR/grid-0000.png
(one row per class), nothing overwritten, each PNG with its class, seed and settings. Image k of
the run uses seed + k. OUTDIR/journal.jsonl lists every finished image (its "prompt" is the class
as given): --resume finishes an interrupted run; torchrun shares the work over processes (see
README, "Large batch runs"). The classes come from --classes, so there is no --from-file.

Example (the notebook's settings):
  python scripts/sample_class.py --classes 25 187 448 992 --n_samples 6 --scale 3.0 --ddim_steps 20 \\
      --ckpt models/ldm/cin256-v2/model.ckpt
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm import cli  # noqa: E402  (light: no torch at import)
from ldm.families import get_family  # noqa: E402

FAMILY = get_family("ldm-cin")
NOTEBOOK_CLASSES = ["25", "187", "448", "992"]  # fire salamander, Yorkshire terrier, birdhouse, agaric


def build_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("--classes", nargs="+", default=NOTEBOOK_CLASSES, metavar="CLASS",
                        help="ImageNet classes to sample: indices 0..999 or names (quote names with spaces) "
                             "(default: the notebook's 25 187 448 992)")
    parser.add_argument("--list_classes", nargs="?", const="", default=None, metavar="WORD",
                        help="print the ImageNet classes (those whose names contain WORD) with their indices and exit")
    parser.add_argument("--null_class", type=int, default=None,
                        help="class-embedding row used as the unconditional class of guidance (default: 1000 for "
                             "a 1001-row table as cin256-v2's; none otherwise)")
    cli.add_output_args(parser, "outputs/class-samples")
    cli.add_batch_args(parser)
    cli.add_sampling_args(parser, "sample_class", n_samples=6, n_iter=1, seed=42, family=FAMILY.name)
    cli.add_size_args(parser, default=None, help_extra=" (default: the model family's, 256)")
    cli.add_model_args(parser, config=FAMILY.config, ckpt=FAMILY.checkpoint)
    cli.add_safety_args(parser)
    return parser


def list_classes(word: str) -> None:
    from ldm.generate.classcond import imagenet_classes

    for index, names in enumerate(imagenet_classes()):
        if word.lower() in ", ".join(names).lower():
            print(f"{index}: {', '.join(names)}")


def run(opt) -> None:
    if opt.list_classes is not None:
        return list_classes(opt.list_classes)
    scale_given = opt.scale is not None
    plan = cli.plan_run(opt, "sample_class", expected_ckpt=FAMILY.checkpoint, fill_size=True)
    from ldm.generate.classcond import class_table, parse_class
    from ldm.util import config_get

    # every class name and index against the config's class table, before the model is loaded
    rows = int(config_get(plan.config.model, "params", "cond_stage_config", "params", "n_classes", default=1000))
    n_classes, _ = class_table(rows, opt.null_class)
    labels = {c: parse_class(c, n_classes) for c in opt.classes}
    # --n_samples images per class and iteration; torchrun's processes; the journal
    job = cli.plan_batch(opt, plan, "sample_class", data=[[c] * opt.n_samples for c in opt.classes],
                         extra={"classes": [labels[c] for c in opt.classes]})

    # -- the run
    from ldm.generate import ImageWriter

    sd = cli.load_pipeline(opt, plan, job)
    writer = ImageWriter(plan.outdir, save_samples=not opt.skip_save, save_grid=not opt.skip_grid)

    def render(items):  # one batch of work items with equal settings (ldm.batch.items.WorkItem)
        s = items[0]
        return sd.sample_class([labels[i.prompt] for i in items], [i.seed for i in items], steps=s.steps,
                               sampler=s.sampler, scale=s.scale if scale_given else None, eta=s.eta, width=s.width,
                               height=s.height, null_class=opt.null_class)

    cli.run_batch(job, render, writer)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
