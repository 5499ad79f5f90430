"""ldm.image_io: robust loading, the reference's pixel conversions, make_grid, and safe numbered saves.

torch is imported inside the tensor tests only: the multiprocessing test spawns children that
import this module, and they should not pay for torch.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import re

import numpy as np
import pytest
from PIL import Image

from ldm.errors import UserInputError
from ldm.image_io import (
    count_existing,
    image_to_tensor,
    load_image,
    load_mask,
    make_grid,
    resize_to_multiple,
    save_named,
    save_numbered,
    tensor_to_uint8,
    to_rgb,
)


# --------------------------------------------------------------------------------------------
# load_image: every mode becomes RGB


def _px(im, xy):
    return tuple(int(v) for v in im.getpixel(xy))


def test_rgba_composited_on_white(tmp_path):
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    im.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid gray
    path = tmp_path / "a.png"
    im.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (8, 8)
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in _px(out, (1, 0)))
    assert _px(out, (5, 5)) == (255, 0, 0)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (6, 6), 1)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    im.putpixel((2, 2), 0)
    path = tmp_path / "p.png"
    im.save(path, transparency=0)
    out = load_image(path)
    assert out.mode == "RGB"
    assert _px(out, (2, 2)) == (255, 255, 255)  # transparent index -> white
    assert _px(out, (0, 0)) == (0, 255, 0)


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 77, (77, 77, 77)),
    ("LA", (77, 255), (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_simple_modes(tmp_path, mode, value, expected):
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    Image.new(mode, (4, 3), value).save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (4, 3)
    assert _px(out, (1, 1)) == expected


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a 16-bit file
    out = load_image(path)
    assert [_px(out, (x, 0))[0] for x in range(4)] == [0, 128, 255, 4]


def test_32bit_int_mode_with_16bit_values():
    im = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert im.mode == "I"
    assert [_px(to_rgb(im), (x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red
    a[:, 20:] = (0, 0, 255)  # right half blue
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    im.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # portrait after rotation
    top, bottom = _px(out, (10, 5)), _px(out, (10, 35))
    assert top[0] > 200 and top[2] < 60  # the left side is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def _valid_png_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case, needle", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("text", "not an image"),
    ("garbage", "not an image"),
    ("truncated", "corrupt"),
    ("folder", "folder"),
])
def test_bad_files_give_one_line_errors(tmp_path, case, needle):
    path = tmp_path / f"{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path = tmp_path / "notes.jpg"
        path.write_text("hello, this is not a picture\n")
    elif case == "garbage":
        path.write_bytes(os.urandom(2048))
    elif case == "truncated":
        data = _valid_png_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "folder":
        path.mkdir()
    with pytest.raises(UserInputError) as info:
        load_image(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    assert str(path) in msg
    assert needle in msg


# --------------------------------------------------------------------------------------------
# load_mask


def test_mask_is_L_and_transparent_means_keep(tmp_path):
    m = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    m.paste((255, 255, 255, 255), (0, 0, 8, 8))  # painted left half
    path = tmp_path / "mask.png"
    m.save(path)
    out = load_mask(path, (16, 8))
    assert out.mode == "L" and out.size == (16, 8)
    assert out.getpixel((2, 2)) == 255 and out.getpixel((12, 2)) == 0


def test_mask_gray_values_kept(tmp_path):
    path = tmp_path / "mask.png"
    Image.new("L", (8, 8), 100).save(path)
    assert load_mask(path, (8, 8)).getpixel((3, 3)) == 100


def test_mask_size_mismatch_names_both_sizes(tmp_path):
    path = tmp_path / "mask.png"
    Image.new("L", (512, 384), 255).save(path)
    with pytest.raises(UserInputError, match=r"512x384.*512x512"):
        load_mask(path, (512, 512))


def test_mask_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="mask .*not found"):
        load_mask(tmp_path / "nope.png", (8, 8))


# --------------------------------------------------------------------------------------------
# resize_to_multiple


@pytest.mark.parametrize("size, multiple, expected", [
    ((100, 70), 32, (96, 64)),
    ((100, 70), 64, (64, 64)),
    ((100, 70), 8, (96, 64)),
    ((520, 776), 8, (520, 776)),
    ((513, 767), 32, (512, 736)),
])
def test_resize_rounds_down(size, multiple, expected):
    im = Image.new("RGB", size, (10, 20, 30))
    assert resize_to_multiple(im, multiple).size == expected


def test_resize_keeps_fitting_image_and_matches_pil_lanczos():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 100, 3), dtype=np.uint8))
    fitting = Image.new("RGB", (64, 96))
    assert resize_to_multiple(fitting, 32) is fitting
    out = resize_to_multiple(im, 32)
    assert np.array_equal(np.asarray(out), np.asarray(im.resize((96, 64), resample=Image.LANCZOS)))


def test_resize_too_small_and_bad_multiple():
    with pytest.raises(UserInputError, match="at least 32"):
        resize_to_multiple(Image.new("RGB", (20, 500)), 32)
    with pytest.raises(ValueError):
        resize_to_multiple(Image.new("RGB", (64, 64)), 0)


# --------------------------------------------------------------------------------------------
# image_to_tensor / tensor_to_uint8 (the reference's numbers)


def test_image_to_tensor_values():
    import torch

    a = np.array([[[0, 255, 51]]], dtype=np.uint8)  # 1x1 RGB
    t = image_to_tensor(Image.fromarray(a))
    assert t.shape == (1, 3, 1, 1) and t.dtype == torch.float32
    expected = 2.0 * torch.tensor([0.0, 1.0, np.float32(51) / np.float32(255)], dtype=torch.float32) - 1.0
    assert torch.equal(t.flatten(), expected)


def test_image_to_tensor_matches_reference_init_image(parity):
    import torch

    init = parity["img2img"]["init_image"][:1]  # [1, 3, 64, 128], built by the reference load_img
    pixels = ((init + 1) / 2 * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert torch.equal(image_to_tensor(Image.fromarray(pixels)), init)


def test_tensor_to_uint8_truncates():
    import torch

    # (x+1)/2*255 = 254.9 -> 254 (truncation), 0.99 -> 0, clamps outside [-1, 1]
    vals = torch.tensor([254.9 / 255 * 2 - 1, 0.99 / 255 * 2 - 1, 1.5, -3.0], dtype=torch.float32)
    x = vals.view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = tensor_to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 4, 3)
    assert out[0, 0, :, 0].tolist() == [254, 0, 255, 0]


def test_tensor_to_uint8_nan_becomes_black(caplog):
    import torch

    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 0, 0] = float("nan")
    out = tensor_to_uint8(x)
    assert out[0, 0, 0].tolist() == [0, 0, 0] and out[0, 1, 1].tolist() == [127, 127, 127]
    assert "NaN" in caplog.text


@pytest.mark.parametrize("path", [("txt2img", "ddim"), ("txt2img", "plms"), ("txt2img", "dpm_solver"), ("img2img",)])
def test_tensor_to_uint8_matches_reference_outputs(parity, path):
    node = parity
    for key in path:
        node = node[key]
    out = tensor_to_uint8(node["decoded"])
    assert np.array_equal(out, node["uint8"].numpy())


# --------------------------------------------------------------------------------------------
# make_grid


def _solid(value, h=64, w=64):
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_make_grid_layout_three_images_two_per_row():
    imgs = [_solid(10), _solid(20), _solid(30)]
    grid = make_grid(imgs, nrow=2)
    assert grid.shape == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2, 3) and grid.dtype == np.uint8
    # row-major: (row 0: img0, img1), (row 1: img2, empty)
    assert (grid[2:66, 2:66] == 10).all()
    assert (grid[2:66, 68:132] == 20).all()
    assert (grid[68:132, 2:66] == 30).all()
    assert (grid[68:132, 68:132] == 0).all()
    # 2-pixel borders of pad value 0 around and between cells
    for sl in (grid[:2], grid[66:68], grid[132:], grid[:, :2], grid[:, 66:68], grid[:, 132:]):
        assert (sl == 0).all()


def test_make_grid_wide_nrow_array_input_and_pad_value():
    batch = np.stack([_solid(v, 8, 12) for v in (1, 2, 3)])
    grid = make_grid(batch, nrow=8, padding=1, pad_value=255)
    assert grid.shape == (8 + 2, 3 * 13 + 1, 3)  # one row of 3 (cols = min(nrow, N))
    assert (grid[1:9, 1 + 2 * 13 : 13 + 2 * 13 - 1] == 3).all()
    assert (grid[0] == 255).all()


def test_make_grid_single_image_has_no_border():
    img = _solid(7, 5, 6)
    assert np.array_equal(make_grid([img], nrow=2), img)  # as torchvision


def test_make_grid_rejects_mixed_shapes():
    with pytest.raises(ValueError, match="same shape"):
        make_grid([_solid(1, 8, 8), _solid(1, 8, 16)], nrow=2)


# --------------------------------------------------------------------------------------------
# save_numbered


def test_numbers_follow_file_count_like_the_reference(tmp_path):
    out = tmp_path / "out"
    samples = out / "samples"
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    assert save_numbered(img, samples).name == "00000.png"
    assert save_numbered(np.asarray(img), samples).name == "00001.png"
    # grids live next to the samples folder, which does not count
    assert save_numbered(img, out, "grid-{:04}.png").name == "grid-0000.png"
    assert save_numbered(img, out, "grid-{:04}.png").name == "grid-0001.png"
    assert sorted(os.listdir(samples)) == ["00000.png", "00001.png"]
    assert count_existing(out) == 2


def test_never_overwrites_existing_file(tmp_path):
    (tmp_path / "00001.png").write_bytes(b"keep me")  # count is 1, but 00001 is taken
    img = Image.new("RGB", (8, 8))
    first = save_numbered(img, tmp_path)
    assert first.name == "00002.png"
    assert (tmp_path / "00001.png").read_bytes() == b"keep me"
    assert save_numbered(img, tmp_path, start=0).name == "00000.png"
    assert save_numbered(img, tmp_path, start=0).name == "00003.png"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp files left


def test_works_without_hard_links(tmp_path, monkeypatch):
    import errno

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)  # e.g. FAT or some network shares
    (tmp_path / "00001.png").write_bytes(b"keep me")
    img = Image.new("RGB", (8, 8), (9, 9, 9))
    assert [save_numbered(img, tmp_path, start=0).name for _ in range(3)] == ["00000.png", "00002.png", "00003.png"]
    assert (tmp_path / "00001.png").read_bytes() == b"keep me"
    with Image.open(tmp_path / "00002.png") as im:
        assert im.getpixel((0, 0)) == (9, 9, 9)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_save_named_adds_a_suffix_instead_of_overwriting(tmp_path):
    from ldm.metadata import pnginfo

    (tmp_path / "result.png").write_bytes(b"keep me")
    img = Image.new("RGB", (8, 8), (4, 5, 6))
    names = [save_named(img, tmp_path, "result.png", pnginfo("x\nSteps: 1")).name for _ in range(2)]
    assert names == ["result-1.png", "result-2.png"]
    assert (tmp_path / "result.png").read_bytes() == b"keep me"
    with Image.open(tmp_path / "result-2.png") as im:
        assert im.getpixel((0, 0)) == (4, 5, 6) and im.info["parameters"] == "x\nSteps: 1"
    assert save_named(img, tmp_path / "new", "a.png").name == "a.png"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    with pytest.raises(UserInputError, match="not a path"):
        save_named(img, tmp_path, "sub/a.png")


def test_bad_patterns(tmp_path):
    img = Image.new("RGB", (8, 8))
    with pytest.raises(UserInputError, match="no number"):
        save_numbered(img, tmp_path, "fixed.png")
    with pytest.raises(UserInputError, match="format"):
        save_numbered(img, tmp_path, "{:05}.unknownext")
    with pytest.raises(UserInputError, match="not a path"):
        save_numbered(img, tmp_path, "sub/{:05}.png")


def test_saves_png_text_chunk(tmp_path):
    from ldm.metadata import pnginfo

    path = save_numbered(Image.new("RGB", (8, 8)), tmp_path, pnginfo=pnginfo("a cat\nSteps: 1, Seed: 2, Size: 8x8"))
    with Image.open(path) as im:
        assert im.info["parameters"] == "a cat\nSteps: 1, Seed: 2, Size: 8x8"


def _writer(folder, worker, count, barrier):
    barrier.wait()
    for i in range(count):
        a = np.random.default_rng(worker * 1000 + i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        a[0, 0] = (worker, i, 7)  # who wrote it
        save_numbered(Image.fromarray(a), folder)


def test_two_processes_never_overwrite_each_other(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 20, barrier)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 40 and all(re.fullmatch(r"\d{5}\.png", n) for n in names)
    assert [int(n[:5]) for n in names] == list(range(40))
    seen = set()
    for n in names:
        with Image.open(tmp_path / n) as im:
            im.load()  # complete, decodable file
            seen.add(im.getpixel((0, 0)))
    assert seen == {(w, i, 7) for w in (1, 2) for i in range(20)}
