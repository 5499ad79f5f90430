#!/usr/bin/env python
"""Sample an unconditional latent diffusion model (LSUN churches/bedrooms, CelebA-HQ, FFHQ).

The original CompVis/latent-diffusion script, with its flags and output layout:
LOGDIR/samples/<global step:08>/<YYYY-mm-dd-HH-MM-SS>/ holds img/sample_000000.png, ... (one per
sample, with its generation parameters in the PNG), numpy/<N>x<H>x<W>x3-samples.npz (every sample
as uint8 NHWC, array arr_0, written at the end) and sampling_config.yaml (the options of the run).
LOGDIR is the checkpoint's folder, or -l DIR/<that folder's name>. The config is config.yaml beside
the checkpoint (the models/ldm/<name>/ layout) unless --config says otherwise; KEY=VALUE arguments
override config entries (OmegaConf dot-list, e.g. model.params.unet_config.params.image_size=64).

Differences from the original: numbering starts at sample_000000.png (the original's first file
was sample_-00001.png); a last, smaller batch makes up -n when it is not a multiple of
--batch_size (the original dropped the remainder and crashed when -n < --batch_size); image k uses
seed --seed + k whatever the batch (re-make it with --seed <its seed> -n 1); a run never writes
into an existing folder; the device is chosen (--device) instead of always CUDA.

Examples:
  python scripts/sample_diffusion.py -r models/ldm/lsun_churches256/model.ckpt -l outputs -n 8 --batch_size 4 -c 200 -e 0
  python scripts/sample_diffusion.py -r models/ldm/celeba256 -n 4 -c 50
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm import cli  # noqa: E402  (light: no torch at import)


def build_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("-r", "--resume", type=str, required=True,
                        help="checkpoint file, or a folder holding model.ckpt (and config.yaml)")
    parser.add_argument("-n", "--n_samples", type=int, default=50000, help="number of samples to draw")
    parser.add_argument("-e", "--eta", type=float, default=1.0, help="DDIM eta (0 is deterministic)")
    parser.add_argument("-v", "--vanilla_sample", action="store_true",
                        help="DDPM ancestral sampling over every timestep (1000 model calls per batch) instead of "
                             "DDIM; -c and -e are then not used")
    parser.add_argument("-l", "--logdir", type=str, default="none",
                        help="output root: samples go to LOGDIR/<checkpoint folder name>/samples/...; 'none': into "
                             "the checkpoint's folder")
    parser.add_argument("-c", "--custom_steps", type=int, default=50, help="number of DDIM steps")
    parser.add_argument("--batch_size", type=int, default=10, help="samples per batch")
    parser.add_argument("--seed", type=int, default=42, help="seed of the first sample; sample k uses seed + k")
    parser.add_argument("--config", type=str, default=None,
                        help="model config (default: config.yaml in the checkpoint's folder)")
    parser.add_argument("--device", type=str, default="auto",
                        help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", type=str, choices=cli.PRECISION_CHOICES, default="auto",
                        help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32; fp32/full; fp16; bf16; "
                             "autocast (fp16 on CUDA, else fp32)")
    parser.add_argument("--fast_batch", action="store_true",
                        help="run each batch through the networks at once (always so on CUDA and MPS): a sample "
                             "then differs by float rounding from the one its seed gives alone; on the CPU samples "
                             "are otherwise computed one at a time and are bit-identical per seed")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides in OmegaConf dot-list form (model.params.x=1)")
    return parser


def resolve_resume(resume: str) -> tuple:
    """``(checkpoint, its folder)`` from ``-r`` (a file, or a folder with ``model.ckpt``)."""
    p = Path(resume)
    if p.is_dir():
        ckpt = p / "model.ckpt"
        if not ckpt.is_file():
            raise cli.UserInputError(f"-r {p}: the folder holds no model.ckpt; pass the checkpoint file or the "
                                     "folder it is in")
        return ckpt, p
    if not p.exists():
        raise cli.UserInputError(f"-r {p}: not found; pass a checkpoint file or the folder holding model.ckpt "
                                 "(e.g. models/ldm/lsun_churches256/model.ckpt)")
    return p, p.parent


def load_run_config(opt, folder: Path):
    """The model config with the ``KEY=VALUE`` overrides merged in."""
    from omegaconf import OmegaConf

    from ldm.generate.config import load_config

    path = Path(opt.config) if opt.config else folder / "config.yaml"
    if not opt.config and not path.is_file():
        raise cli.UserInputError(f"no config.yaml beside the checkpoint in {folder}; put the model's config.yaml "
                                 "there (models/ldm/<name>/config.yaml of CompVis/latent-diffusion) or pass --config")
    config = load_config(path)
    bad = [o for o in opt.overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise cli.UserInputError(f"argument {bad[0]!r} is neither a flag nor a KEY=VALUE config override "
                                 "(e.g. model.params.unet_config.params.image_size=64)")
    try:
        return path, OmegaConf.merge(config, OmegaConf.from_dotlist(list(opt.overrides)))
    except Exception as exc:  # OmegaConf's parse/merge errors all mean a bad override
        raise cli.UserInputError(f"config overrides {' '.join(opt.overrides)} cannot be applied "
                                 f"({str(exc).splitlines()[0]}); use KEY=VALUE with keys of the config") from None


def new_run_folder(base: Path, stamp: Optional[str] = None) -> Path:
    """``base/<stamp>`` (default: now as ``YYYY-mm-dd-HH-MM-SS``), ``<stamp>-1``, ``-2``, ... when a
    run of the same second has it: a run never writes into an existing folder."""
    import datetime

    stamp = stamp or datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    for k in range(1000):
        folder = base / (stamp if k == 0 else f"{stamp}-{k}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise cli.UserInputError(f"cannot make a new run folder in {base}; clear it out")


def save_npz(samples: list, folder: Path) -> Path:
    """All samples as one uint8 NHWC array ``arr_0``, written to a temporary name then renamed."""
    import numpy as np

    arr = np.stack(samples)
    path = folder / f"{'x'.join(str(s) for s in arr.shape)}-samples.npz"
    tmp = folder / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, arr)
    tmp.rename(path)
    return path


def run(opt) -> None:
    # -- every check, before any model is loaded
    ckpt, folder = resolve_resume(opt.resume)
    config_path, config = load_run_config(opt, folder)
    from ldm.generate.config import describe_config

    family = describe_config(config).family
    if "sample_diffusion" not in family.methods:
        raise cli.UserInputError(f"config {config_path} is not an unconditional model: {family.usage_hint()}")
    cli.check_positive(n_samples=opt.n_samples, batch_size=opt.batch_size)
    if not opt.vanilla_sample:
        cli.check_positive(custom_steps=opt.custom_steps)
        if opt.eta < 0:
            raise cli.UserInputError(f"-e/--eta {opt.eta} is negative; use 0 (deterministic) to 1")
        from ldm.models.diffusion.registry import check_steps

        check_steps("ddim", opt.custom_steps)
    from ldm.devices import resolve_placement, seed_generators

    seed_generators(opt.seed, opt.n_samples)  # every seed of the run must be valid
    cli.check_checkpoint(str(ckpt), family.checkpoint)
    base = folder if opt.logdir == "none" else Path(opt.logdir) / folder.resolve().name
    cli.check_outdir(str(base))
    cli.check_watermark_available()
    device, dtype = resolve_placement(opt.device, opt.precision)

    # -- the run
    import numpy as np
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from ldm.checkpoint import read_checkpoint
    from ldm.generate import ImageWriter, StableDiffusion
    from ldm.generate.records import SAFETY_NOT_NEEDED

    step = read_checkpoint(ckpt).global_step
    if step is None:
        cli.log.info("the checkpoint records no global_step; its samples go to samples/00000000")
    sd = StableDiffusion.from_files(config, ckpt, device=device, precision=dtype, safety_status=SAFETY_NOT_NEEDED,
                                    exact_batches=device.type == "cpu" and not opt.fast_batch)
    run_dir = new_run_folder(base / "samples" / f"{step or 0:08}")
    img_dir, npz_dir = run_dir / "img", run_dir / "numpy"
    img_dir.mkdir()
    npz_dir.mkdir()
    settings = {**vars(opt), "ckpt": str(ckpt), "config": str(config_path), "global_step": step,
                "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    (run_dir / "sampling_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(settings)))
    cli.log.info("writing %d samples to %s", opt.n_samples, run_dir)

    writer = ImageWriter(run_dir, sample_dir=None, save_grid=False)
    samples = []
    for start in tqdm(range(0, opt.n_samples, opt.batch_size), desc="Sampling batches (unconditional)"):
        seeds = [opt.seed + k for k in range(start, min(start + opt.batch_size, opt.n_samples))]
        result = sd.sample_diffusion(seeds, steps=opt.custom_steps, eta=opt.eta, vanilla=opt.vanilla_sample)
        samples.extend(np.asarray(image) for image in result.images)
        paths = [writer.write(image, record, img_dir, "sample_{:06}.png")
                 for image, record in zip(result.images, result.records)]
        cli.report_saved(paths, result.records)
    cli.log.info("all samples: %s", save_npz(samples, npz_dir))
    cli.log.info("your samples are in %s", run_dir)


def main(argv=None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
