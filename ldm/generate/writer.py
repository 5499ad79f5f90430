"""Writing results: :class:`ImageWriter` lays images out as the reference scripts did, with the
invisible watermark and the PNG metadata, and never overwrites a file."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from ldm.errors import UserInputError
from ldm.generate.records import WATERMARK_TOO_SMALL, GenerationResult, ImageRecord

__all__ = ["ImageWriter"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class ImageWriter:
    """Writes images as the reference scripts laid them out, with watermark and metadata.

    ``outdir/samples/00000.png, 00001.png, ...`` and ``outdir/grid-0000.png``; numbers continue
    after what is there and nothing is ever overwritten, also with several runs writing at once
    (:func:`ldm.image_save.save_numbered`). Batch runs (:mod:`ldm.batch`) name image ``k`` of a run
    ``{first + k:05}.png`` instead (:meth:`write` with ``name``), ``first`` fixed when the run
    starts, and give :meth:`write_grid` its first number. Every file gets the invisible watermark
    (images under 256x256 cannot hold it: logged once and recorded as ``Watermark: none (too
    small)``) with the text of its record (its model family's) and the ``parameters`` text of its
    record.

    :param save_samples: write each image (``--skip_save`` turns it off).
    :param save_grid: keep images for :meth:`write_grid` (``--skip_grid`` turns it off).
    """

    def __init__(self, outdir: PathLike, *, sample_dir: Optional[str] = "samples", save_samples: bool = True,
                 save_grid: bool = True):
        self.outdir = Path(outdir)
        self.sample_dir = self.outdir / sample_dir if sample_dir else self.outdir
        self.save_samples = save_samples
        self.save_grid = save_grid
        self.grid_images: list = []
        self.grid_records: list = []
        self._told_small = False

    def add(self, result: GenerationResult) -> list:
        """Write the images of ``result`` (unless ``save_samples`` is off); returns their paths."""
        paths = []
        for image, record in zip(result.images, result.records):
            if self.save_samples:
                paths.append(self.write(image, record, self.sample_dir))
            if self.save_grid:
                self.grid_images.append(np.asarray(image))
                self.grid_records.append(record)
        return paths

    def write(self, image: Image.Image, record: ImageRecord, folder: PathLike, pattern: str = "{:05}.png",
              name: Optional[str] = None, start: Optional[int] = None) -> Path:
        """Watermark ``image``, set ``record.watermark`` and write it with its metadata.

        :param name: write ``folder/name`` (``stem-1.png``, ``stem-2.png``, ... when taken) instead
            of the next number of ``pattern``.
        :param start: the first number of ``pattern`` to try (default: the count of files there).
        """
        from ldm.image_save import save_named, save_numbered

        marked, info = self._marked(image, record)
        try:
            if name is None:
                return save_numbered(marked, folder, pattern, pnginfo=info, start=start)
            return save_named(marked, folder, name, info)
        except OSError as exc:
            raise UserInputError(f"cannot write into {folder} ({exc.strerror or exc}); pass --outdir with a folder "
                                 "you can write to and that has free space") from None

    def encode(self, image: Image.Image, record: ImageRecord) -> bytes:
        """The PNG bytes :meth:`write` writes for ``image`` (watermark and metadata included)."""
        import io

        marked, info = self._marked(image, record)
        buffer = io.BytesIO()
        marked.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()

    def write_grid(self, n_per_row: int, start: Optional[int] = None) -> Optional[Path]:
        """Write one grid of every image added so far, ``n_per_row`` per row; None when there are none.

        :param start: the first grid number to try (default: the count of files in the folder).
        """
        from ldm.image_io import make_grid

        if not self.save_grid or not self.grid_images:
            return None
        if len({a.shape for a in self.grid_images}) > 1:
            log.warning("images of different sizes: no grid written")
            return None
        grid = Image.fromarray(make_grid(self.grid_images, nrow=max(1, int(n_per_row))))
        first = self.grid_records[0]  # the grid carries the parameters of its first image
        record = ImageRecord(**{**vars(first), "extra": {**first.extra, "Grid": f"{len(self.grid_images)} images"}})
        if any(r.nsfw for r in self.grid_records):
            record.safety = f"{sum(r.nsfw for r in self.grid_records)} image(s) replaced by a placeholder"
        return self.write(grid, record, self.outdir, "grid-{:04}.png", start=start)

    def _marked(self, image: Image.Image, record: ImageRecord):
        """``(watermarked image, PNG metadata)``; sets ``record.watermark``."""
        from ldm.metadata import pnginfo

        marked, record.watermark = self._watermark(image, record.watermark_text)
        return marked, pnginfo(record.parameters())

    def _watermark(self, image: Image.Image, text: str):
        from ldm.watermark import add_watermark

        marked, ok = add_watermark(image, text)
        if ok:
            return marked, text
        if not self._told_small:
            log.info("images under 256x256 pixels cannot hold the invisible watermark; their metadata says "
                     "'Watermark: %s'", WATERMARK_TOO_SMALL)
            self._told_small = True
        return marked, WATERMARK_TOO_SMALL
