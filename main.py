"""Train a model from YAML configs, as the reference's ``main.py``::

    python main.py --base configs/demo/demo-autoencoder.yaml -t
    python main.py --base CONFIG.yaml -t --name myrun lightning.trainer.max_steps=1000
    python main.py --resume logs/2024-01-01T00-00-00_myrun -t

Configs are merged left to right, then ``key.sub=value`` arguments on top (OmegaConf dotlist).
A config has ``model`` (``base_learning_rate``, ``target``, ``params``), ``data`` (a
``DataModuleFromConfig`` with per-split datasets) and optionally ``lightning`` (``trainer`` options
such as ``max_steps`` and ``accelerator``, ``callbacks``, ``modelcheckpoint``, ``logger``).
The run writes to ``logs/<time>_<name>/`` (``checkpoints/``, ``configs/``, ``csvlogs/``).
The learning rate is ``accumulate_grad_batches · devices · batch_size · base_learning_rate``
unless ``--scale_lr false``. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys

from ldm.training.data import DataModuleFromConfig  # noqa: F401  (configs may name main.DataModuleFromConfig)

log = logging.getLogger("main")


def str2bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("boolean value expected (true/false)")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other arguments key.sub=value override the configs.")
    p.add_argument("-n", "--name", type=str, default="", help="postfix of the log directory (default: config name)")
    p.add_argument("-r", "--resume", type=str, default="", help="resume from a run directory or a checkpoint in one")
    p.add_argument("-b", "--base", nargs="*", metavar="config.yaml", default=[],
                   help="configs, merged left to right")
    p.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    p.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?",
                   help="skip testing after training (tests run only when data has a test split)")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    p.add_argument("-f", "--postfix", type=str, default="", help="post-postfix of the log directory name")
    p.add_argument("-l", "--logdir", type=str, default="logs", help="parent directory of run directories")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="scale base_learning_rate by accumulate_grad_batches * devices * batch_size")
    p.add_argument("--batch_size", type=int, default=None, help="override data.params.batch_size")
    p.add_argument("--max_steps", type=int, default=None, help="override lightning.trainer.max_steps")
    p.add_argument("--accelerator", type=str, default=None, help="override lightning.trainer.accelerator (cpu, gpu)")
    p.add_argument("--devices", type=str, default=None, help="override lightning.trainer.devices")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.append(os.getcwd())  # configs may name classes of this file (main.DataModuleFromConfig)
    opt, unknown = get_parser().parse_known_args(argv)

    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from ldm.errors import UserInputError
    from ldm.training.run import TIME_FORMAT, load_configs, resolve_paths, train

    now = datetime.datetime.now().strftime(TIME_FORMAT)
    try:
        paths = resolve_paths(now, opt.base, opt.name, opt.resume, opt.postfix, opt.logdir)
        config = load_configs(paths.base_configs, unknown)
        trainer_cfg = OmegaConf.select(config, "lightning.trainer", default=None) or OmegaConf.create()
        for key in ("max_steps", "accelerator", "devices"):
            if getattr(opt, key) is not None:
                trainer_cfg[key] = getattr(opt, key)
        config.lightning = OmegaConf.merge(config.get("lightning", OmegaConf.create()), {"trainer": trainer_cfg})
        if opt.batch_size is not None:
            config.data.params.batch_size = opt.batch_size
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not opt.train:
        print("error: nothing to do; pass -t to train (this script only trains)", file=sys.stderr)
        return 2
    pl.seed_everything(opt.seed, workers=True)
    log.info("run %s", paths.logdir)
    try:
        train(config, paths, now, scale_lr=opt.scale_lr, run_test=not opt.no_test)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
