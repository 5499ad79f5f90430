"""The ``data:`` section of a training config: a LightningDataModule built from dataset configs."""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from ldm.errors import UserInputError
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "predict")


class WrappedDataset(Dataset):
    """Any object with ``__len__`` and ``__getitem__`` as a torch Dataset."""

    def __init__(self, dataset):
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


class DataModuleFromConfig(pl.LightningDataModule):
    """Datasets named by ``{target, params}`` nodes, one per split, with the reference's parameters.

    ``data: {target: ldm.training.DataModuleFromConfig, params: {batch_size: 16, train: {...},
    validation: {...}}}`` (``main.DataModuleFromConfig`` names the same class). Only the splits
    given get a dataloader; the training loader shuffles, the others do not unless asked.

    :param batch_size: images per batch (per device).
    :param num_workers: DataLoader worker processes. ``None`` means the reference's default,
        ``2 * batch_size``, capped at the number of CPUs here; set 0 for cheap datasets.
    :param wrap: wrap each dataset in :class:`WrappedDataset` (for objects that are not Datasets).
    :param use_worker_init_fn: accepted for config compatibility; per-worker seeding is left to
        Lightning's ``seed_everything(workers=True)``.
    """

    def __init__(self, batch_size: int, train: Optional[Mapping[str, Any]] = None,
                 validation: Optional[Mapping[str, Any]] = None, test: Optional[Mapping[str, Any]] = None,
                 predict: Optional[Mapping[str, Any]] = None, wrap: bool = False,
                 num_workers: Optional[int] = None, shuffle_test_loader: bool = False,
                 use_worker_init_fn: bool = False, shuffle_val_dataloader: bool = False):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserInputError(f"data.params.batch_size must be a positive int, got {batch_size!r}")
        if num_workers is None:
            num_workers = min(2 * batch_size, os.cpu_count() or 1)
        if num_workers < 0:
            raise UserInputError(f"data.params.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.wrap = wrap
        self.shuffle_val_dataloader = shuffle_val_dataloader
        self.shuffle_test_loader = shuffle_test_loader
        self.dataset_configs = {name: cfg for name, cfg in zip(SPLITS, (train, validation, test, predict))
                                if cfg is not None}
        if not self.dataset_configs:
            raise UserInputError("data.params names no dataset; give at least train: {target: ..., params: ...}")
        self.datasets: dict[str, Dataset] = {}
        # Lightning only runs the loops whose dataloader method the datamodule defines, so the
        # methods exist only for the splits that were configured (as in the reference).
        loaders = {"train": self._train_dataloader, "validation": self._val_dataloader,
                   "test": self._test_dataloader, "predict": self._predict_dataloader}
        hooks = {"train": "train_dataloader", "validation": "val_dataloader",
                 "test": "test_dataloader", "predict": "predict_dataloader"}
        for name in self.dataset_configs:
            setattr(self, hooks[name], loaders[name])

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        for name, cfg in self.dataset_configs.items():
            dataset = instantiate_from_config(cfg)
            self.datasets[name] = WrappedDataset(dataset) if self.wrap else dataset
            log.info("%s dataset: %s with %d items", name, type(dataset).__name__, len(dataset))

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(self.datasets[name], batch_size=self.batch_size, num_workers=self.num_workers,
                          shuffle=shuffle, persistent_workers=self.num_workers > 0)

    def _train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def _val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=self.shuffle_val_dataloader)

    def _test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=self.shuffle_test_loader)

    def _predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
