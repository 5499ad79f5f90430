"""ldm.watermark and scripts/tests/test_watermark.py (the decoding CLI)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.watermark import WATERMARK_BITS, WATERMARK_TEXT, add_watermark, can_hold_watermark, read_watermark

REPO = Path(__file__).resolve().parents[1]


def natural_image(size: int = 512, seed: int = 0) -> Image.Image:
    """Colour gradients plus multi-scale texture (cloud-like blobs down to pixel grain).

    dwtDct hides each bit in the largest coefficient of a 4x4 block of the half-resolution chroma
    band, so it needs local colour contrast like a real photo or SD sample has; on flat or purely
    smooth images it does not decode, which is why the test image is not a plain gradient.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.stack([120 + 60 * x, 100 + 60 * y, 130 - 40 * x * y], -1)
    for cell, amplitude in ((64, 30), (16, 25), (4, 25), (2, 20), (1, 15)):
        n = size // cell + 2
        for c in range(3):
            coarse = Image.fromarray(rng.normal(0, 1, (n, n)).astype(np.float32), mode="F")
            fine = np.asarray(coarse.resize((n * cell, n * cell), Image.BICUBIC))[:size, :size]
            img[..., c] += amplitude * fine
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def marked():
    original = natural_image(seed=0)
    image, ok = add_watermark(original)
    assert ok
    return original, image


def test_watermark_decodes(marked):
    original, image = marked
    assert image.mode == "RGB" and image.size == original.size
    assert read_watermark(image) == WATERMARK_TEXT
    diff = np.asarray(image, np.float64) - np.asarray(original, np.float64)
    psnr = 10 * np.log10(255**2 / np.mean(diff**2))
    assert psnr > 25  # what the reference's dwtDct settings give (it changes the U chroma only)


@pytest.mark.parametrize("seed", [1, 2])
def test_watermark_decodes_other_images(seed):
    image, ok = add_watermark(natural_image(seed=seed))
    assert ok and read_watermark(image) == WATERMARK_TEXT


def test_watermark_survives_png(marked, tmp_path):
    path = tmp_path / "wm.png"
    marked[1].save(path)
    with Image.open(path) as im:
        assert read_watermark(im) == WATERMARK_TEXT


def test_small_image_is_left_alone():
    small = natural_image(128)
    image, ok = add_watermark(small)
    assert ok is False and image is small
    assert read_watermark(small) is None


@pytest.mark.parametrize("w, h, ok", [(512, 512, True), (256, 256, True), (255, 256, False),
                                      (128, 128, False), (200, 300, False), (4, 20000, False), (128, 768, True)])
def test_capacity(w, h, ok):
    assert can_hold_watermark(w, h) is ok
    assert WATERMARK_BITS == 136


def _cli():
    spec = importlib.util.spec_from_file_location("wm_cli", REPO / "scripts" / "tests" / "test_watermark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_text(marked, tmp_path, capsys):
    path = tmp_path / "wm.png"
    marked[1].save(path)
    assert _cli().main([str(path)]) == 0
    assert capsys.readouterr().out.strip() == WATERMARK_TEXT


def test_cli_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _cli().main([str(tmp_path / "missing.png")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.png" in err and "not found" in err


def test_import_is_light():
    code = "import sys, ldm.watermark; print(sorted({'cv2', 'imwatermark', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_reads_the_sd2_watermark_and_a_family_writes_its_own(tmp_path, capsys):
    from ldm.families import get_family

    text = get_family("sd-v2").watermark
    assert (text, get_family("sd-v1").watermark) == ("SDV2", WATERMARK_TEXT)
    marked, ok = add_watermark(natural_image(512, seed=3), text)
    assert ok and read_watermark(marked, 32) == "SDV2"
    marked.save(tmp_path / "v2.png")
    assert _cli().main([str(tmp_path / "v2.png")]) == 0
    assert capsys.readouterr().out.strip() == "SDV2"
