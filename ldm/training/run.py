"""What ``main.py`` does, as functions: resolve the log directory, merge configs, build the
Lightning trainer with the reference's default callbacks, scale the learning rate, fit.

Layout of a run (as the reference): ``<logdir>/<now>_<name>/`` with ``configs/<now>-project.yaml``,
``configs/<now>-lightning.yaml``, ``checkpoints/`` (``last.ckpt`` plus the ``{epoch:06}`` files of
``ModelCheckpoint``) and ``csvlogs/`` (metrics; the reference used the testtube logger).
"""
from __future__ import annotations

import glob
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.errors import UserInputError
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

TIME_FORMAT = "%Y-%m-%dT%H-%M-%S"


@dataclass
class RunPaths:
    """Where a run writes: ``logdir`` (``.../<nowname>``), its ``checkpoints/`` and ``configs/``."""

    logdir: Path
    nowname: str
    resume_ckpt: Optional[Path] = None
    base_configs: list = field(default_factory=list)

    @property
    def ckptdir(self) -> Path:
        return self.logdir / "checkpoints"

    @property
    def cfgdir(self) -> Path:
        return self.logdir / "configs"


def resolve_paths(now: str, base: Sequence[str], name: str = "", resume: str = "", postfix: str = "",
                  logdir: str = "logs") -> RunPaths:
    """The run directory, as the reference's ``main.py``.

    New run: ``<logdir>/<now>_<name or first config's stem><postfix>``. Resume: ``resume`` is a
    run directory (continues from ``checkpoints/last.ckpt``) or a checkpoint inside one
    (``<run>/checkpoints/x.ckpt``); the run's saved configs are loaded before ``base``.
    """
    if name and resume:
        raise UserInputError("-n/--name and -r/--resume cannot be given together; to resume into a new log "
                             "directory, start a new run with model.params.ckpt_path=CKPT")
    if resume:
        path = Path(resume)
        if not path.exists():
            raise UserInputError(f"--resume {resume}: no such file or directory")
        if path.is_file():
            run_dir, ckpt = path.parent.parent, path
        else:
            run_dir, ckpt = path, path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise UserInputError(f"--resume {resume}: checkpoint {ckpt} not found")
        saved = sorted(glob.glob(str(run_dir / "configs" / "*.yaml")))
        if not saved:
            raise UserInputError(f"--resume {resume}: {run_dir / 'configs'} holds no configs; is it a run directory?")
        return RunPaths(run_dir, run_dir.name, ckpt, saved + list(base))
    if not base:
        raise UserInputError("give at least one config with --base CONFIG.yaml (or --resume a run)")
    if name:
        suffix = "_" + name
    else:
        suffix = "_" + Path(base[0]).stem
    nowname = now + suffix + postfix
    return RunPaths(Path(logdir) / nowname, nowname, None, list(base))


def load_configs(paths: Sequence[str], dotlist: Sequence[str]) -> DictConfig:
    """Merge YAML files left to right, then ``key.sub=value`` overrides (``OmegaConf.from_dotlist``)."""
    bad = [a for a in dotlist if "=" not in a or a.startswith("-")]
    if bad:
        raise UserInputError(f"unrecognised arguments {bad}; config overrides are written key.sub=value "
                             "(e.g. lightning.trainer.max_steps=100)")
    for p in paths:
        if not Path(p).is_file():
            raise UserInputError(f"config {p} not found")
    configs = [OmegaConf.load(p) for p in paths]
    return OmegaConf.merge(*configs, OmegaConf.from_dotlist(list(dotlist)))


class SetupCallback(pl.Callback):
    """Creates the run directories and saves the merged configs when fitting starts; saves
    ``last.ckpt`` when training is interrupted (Ctrl-C)."""

    def __init__(self, resume: bool, now: str, logdir: str, ckptdir: str, cfgdir: str, config, lightning_config):
        super().__init__()
        self.resume, self.now = resume, now
        self.logdir, self.ckptdir, self.cfgdir = Path(logdir), Path(ckptdir), Path(cfgdir)
        self.config, self.lightning_config = config, lightning_config

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank != 0:
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir):
            d.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.cfgdir / f"{self.now}-project.yaml")
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       self.cfgdir / f"{self.now}-lightning.yaml")
        log.info("run directory %s", self.logdir)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and trainer.global_rank == 0:
            log.info("interrupted: saving %s", self.ckptdir / "last.ckpt")
            trainer.save_checkpoint(self.ckptdir / "last.ckpt")


class ProgressLog(pl.Callback):
    """Logs step, logged losses, learning rate and elapsed time every ``every_n_steps`` steps
    (one line each, for log files; the tqdm bar is for terminals)."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        self.every = int(every_n_steps)
        self.start = None

    def on_train_start(self, trainer, pl_module):
        self.start = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every <= 0 or step % self.every:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("train/") or k in ("lr_abs",)}
        text = " ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items()))
        log.info("step %d (%.0f s) %s", step, time.time() - self.start, text)

    def on_validation_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            log.info("validation at step %d: %s", trainer.global_step,
                     " ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))


def _trainer_kwargs(lightning_config: DictConfig) -> dict:
    kwargs = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True)
    gpus = kwargs.pop("gpus", None)
    if gpus not in (None, "", 0):  # the reference's "--gpus 0," style
        kwargs.setdefault("accelerator", "gpu")
        kwargs.setdefault("devices", [int(g) for g in str(gpus).strip(",").split(",") if g.strip()])
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    return kwargs


def build_trainer(paths: RunPaths, now: str, config: DictConfig, lightning_config: DictConfig,
                  model_monitor: Optional[str], has_validation: bool) -> pl.Trainer:
    """A ``pl.Trainer`` from ``lightning.trainer`` with the reference's default callbacks
    (setup, checkpointing, LR monitor) merged with ``lightning.callbacks`` /
    ``lightning.modelcheckpoint`` / ``lightning.logger``."""
    default_logger = {"target": "pytorch_lightning.loggers.CSVLogger",
                      "params": {"save_dir": str(paths.logdir), "name": "csvlogs"}}
    logger_cfg = OmegaConf.merge(default_logger, lightning_config.get("logger", OmegaConf.create()))

    ckpt_cfg = {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                "params": {"dirpath": str(paths.ckptdir), "filename": "{epoch:06}", "verbose": True,
                           "save_last": True}}
    if model_monitor and has_validation:
        log.info("monitoring %s as checkpoint metric", model_monitor)
        ckpt_cfg["params"].update(monitor=model_monitor, save_top_k=3)
    ckpt_cfg = OmegaConf.merge(ckpt_cfg, lightning_config.get("modelcheckpoint", OmegaConf.create()))

    callbacks_cfg = OmegaConf.merge({
        "setup_callback": {"target": "ldm.training.run.SetupCallback",
                           "params": {"resume": paths.resume_ckpt is not None, "now": now,
                                      "logdir": str(paths.logdir), "ckptdir": str(paths.ckptdir),
                                      "cfgdir": str(paths.cfgdir), "config": config,
                                      "lightning_config": lightning_config}},
        "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
        "progress_log": {"target": "ldm.training.run.ProgressLog", "params": {"every_n_steps": 50}},
        "checkpoint_callback": ckpt_cfg,
    }, lightning_config.get("callbacks", OmegaConf.create()))
    callbacks = []
    for key, node in callbacks_cfg.items():
        if key == "setup_callback":  # configs are passed as objects, not rebuilt from YAML
            callbacks.append(SetupCallback(**{**node.params, "config": config, "lightning_config": lightning_config}))
        else:
            callbacks.append(instantiate_from_config(node))
    kwargs = _trainer_kwargs(lightning_config)
    log.info("trainer options %s", kwargs)
    return pl.Trainer(logger=instantiate_from_config(logger_cfg), callbacks=callbacks,
                      default_root_dir=str(paths.logdir), **kwargs)


def learning_rate(base_lr: float, batch_size: int, accumulate_grad_batches: int, num_devices: int,
                  scale_lr: bool) -> float:
    """The reference's rule: ``accumulate_grad_batches · devices · batch_size · base_lr`` when
    ``scale_lr`` (the default), else ``base_lr``."""
    if not scale_lr:
        log.info("learning rate %.2e (not scaled)", base_lr)
        return base_lr
    lr = accumulate_grad_batches * num_devices * batch_size * base_lr
    log.info("learning rate %.2e = %d (accumulate_grad_batches) * %d (devices) * %d (batch size) * %.2e "
             "(base_learning_rate)", lr, accumulate_grad_batches, num_devices, batch_size, base_lr)
    return lr


def train(config: DictConfig, paths: RunPaths, now: str, scale_lr: bool = True, run_test: bool = True):
    """Build model, data and trainer from ``config`` and fit; returns ``(trainer, module)``.

    ``config`` holds ``model`` (with ``base_learning_rate``), ``data`` and optionally
    ``lightning``. Always writes ``checkpoints/last.ckpt`` at the end of training.
    """
    from ldm.training.modules import instantiate_model, wrap_model

    for section in ("model", "data"):
        if section not in config:
            raise UserInputError(f"the config has no '{section}:' section; training needs model and data")
    lightning_config = config.pop("lightning", OmegaConf.create())
    lightning_config.trainer = lightning_config.get("trainer", OmegaConf.create())

    model = instantiate_model(config.model)
    data = instantiate_from_config(config.data)
    data.setup()
    trainer = build_trainer(paths, now, config, lightning_config, getattr(model, "monitor", None),
                            "validation" in data.datasets)
    base_lr = float(config.model.get("base_learning_rate", 1.0e-4))
    accumulate = int(lightning_config.trainer.get("accumulate_grad_batches", 1))
    module = wrap_model(model, learning_rate(base_lr, data.batch_size, accumulate, trainer.num_devices, scale_lr))
    ckpt = str(paths.resume_ckpt) if paths.resume_ckpt else None
    try:
        trainer.fit(module, data, ckpt_path=ckpt, weights_only=True if ckpt else None)
    finally:
        if trainer.global_rank == 0 and trainer.global_step > 0:
            paths.ckptdir.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(paths.ckptdir / "last.ckpt")
            log.info("saved %s at step %d", paths.ckptdir / "last.ckpt", trainer.global_step)
    if run_test and "test" in data.datasets and not trainer.interrupted:
        trainer.test(module, data)
    return trainer, module

