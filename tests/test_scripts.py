"""scripts/txt2img.py, img2img.py and inpaint.py run as a user runs them (subprocesses), on the tiny
random-weight model at 64x64 (256x256 where the watermark is the subject) with 2-4 steps.

Bad input is checked in-process through each script's ``main(argv)`` (same code path, no process
start-up per case) and, for a few representative cases, in a real subprocess as well.
"""
from __future__ import annotations

import functools
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.metadata import model_hash, parse_parameters, read_parameters
from tests.helpers import REPO, TINY_CONFIG, help_entries
from tests.test_generate import (TINY_LDM_CONFIG, TINY_INPAINT_CONFIG, box_mask, random_model, textured_image,
                                 tiny_checker, write_checker_folder)

SCRIPTS = REPO / "scripts"
SMALL = ["--H", "64", "--W", "64", "--ddim_steps", "2", "--n_iter", "1", "--device", "cpu"]


def run_script(name: str, *args, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def assert_one_line_error(returncode: int, stderr: str, *fragments: str) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), errors[0]


def params(path: Path) -> dict:
    return parse_parameters(read_parameters(path))


@functools.lru_cache(maxsize=None)
def load_main(name: str):
    """A script's ``main(argv) -> exit code``, loaded without running it."""
    return runpy.run_path(str(SCRIPTS / name), run_name="loaded_for_tests")["main"]


@pytest.fixture(autouse=True)
def restore_logging():
    """``main()`` installs its stderr handler and levels; undo that after in-process runs."""
    root = logging.getLogger()
    level = root.level
    yield
    from ldm import cli

    if cli._handler is not None:
        root.removeHandler(cli._handler)
        cli._handler = None
    root.setLevel(level)
    logging.getLogger("ldm.models.diffusion").setLevel(logging.NOTSET)


def watermark_bits_correct(path: Path) -> int:
    """How many of the 136 watermark bits decode right (random-weight images are pixel noise, which
    the dwtDct watermark survives only approximately; an unmarked image scores about 68)."""
    import cv2
    from imwatermark import WatermarkDecoder

    from ldm.watermark import WATERMARK_BITS, WATERMARK_TEXT

    with Image.open(path) as im:
        bgr = cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    bits = WatermarkDecoder("bits", WATERMARK_BITS).decode(bgr, "dwtDct")
    expected = np.unpackbits(np.frombuffer(WATERMARK_TEXT.encode(), np.uint8))
    return int((np.asarray(bits, dtype=np.uint8) == expected).sum())


# -- --help ----------------------------------------------------------------------------------------
COMMON_FLAGS = ["--prompt", "--negative_prompt", "--outdir", "--skip_grid", "--skip_save", "--sampler", "--plms",
                "--dpm_solver", "--ddim_eta", "--fixed_code", "--n_iter", "--n_samples", "--n_rows", "--scale",
                "--from-file", "--seed", "--config", "--ckpt", "--use_ema", "--device", "--precision",
                "--safety_checker", "--no_safety_check", "--fast_batch", "--repeat", "--bf16", "--torchscript", "--ipex"]
FLAGS = {
    "txt2img.py": COMMON_FLAGS + ["--ddim_steps", "--laion400m", "--H", "--W", "--C", "--f"],
    "img2img.py": COMMON_FLAGS + ["--ddim_steps", "--init-img", "--strength", "--keep_size", "--H", "--W", "--C",
                                  "--f"],
    "inpaint.py": COMMON_FLAGS + ["--indir", "--steps", "--init-img", "--mask"],
}


@pytest.mark.parametrize("script", sorted(FLAGS))
def test_help_lists_every_flag_with_its_default(script, tmp_path):
    proc = run_script(script, "--help", cwd=tmp_path)
    assert_ok(proc)
    entries = help_entries(proc.stdout)
    for flag in FLAGS[script]:
        assert flag in entries, f"{flag} missing from {script} --help"
        assert "default" in entries[flag], f"{script} --help: {flag} does not state its default: {entries[flag]}"
    assert "(default: 42)" in entries["--seed"]


# -- txt2img ---------------------------------------------------------------------------------------
def test_txt2img_samples_grid_metadata_and_numbering(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    first = run_script("txt2img.py", "--prompt", "a red cube", "--negative_prompt", "blurry", "--n_samples", "2",
                       "--config", TINY_CONFIG, "--ckpt", tiny_ckpt, "--outdir", out, "--no_safety_check", *SMALL,
                       cwd=tmp_path)
    assert_ok(first)
    samples = out / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["00000.png", "00001.png"]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png"]
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # 2 per row (n_rows = n_samples), 2-px padding
    meta = [params(samples / f"0000{k}.png") for k in range(2)]
    assert [m["Seed"] for m in meta] == ["42", "43"]
    assert meta[1]["Prompt"] == "a red cube" and meta[1]["Negative prompt"] == "blurry"
    assert (meta[1]["Steps"], meta[1]["Sampler"], meta[1]["CFG scale"], meta[1]["Size"]) == \
        ("2", "DDIM", "7.5", "64x64")
    assert meta[1]["Model"] == "sd-v1-tiny-random" and meta[1]["Model hash"] == model_hash(tiny_ckpt)
    assert meta[1]["Eta"] == "0.0" and meta[1]["Watermark"] == "none (too small)" and meta[1]["Safety checker"] == "off"
    assert "seed 43" in first.stderr
    before = {p: p.read_bytes() for p in out.rglob("*.png")}

    # a second run into the same folder: numbers continue; image 1 of the batch above, re-made alone
    # from its seed, twice (--fixed_code repeats the seeds in every iteration)
    second = run_script("txt2img.py", "--prompt", "a red cube", "--negative_prompt", "blurry", "--n_samples", "1",
                        "--seed", "43", "--fixed_code", "--config", TINY_CONFIG, "--ckpt", tiny_ckpt, "--outdir", out,
                        "--no_safety_check", *SMALL[:-4], "--n_iter", "2", "--device", "cpu", cwd=tmp_path)
    assert_ok(second)
    assert sorted(p.name for p in samples.iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing overwritten
    assert [params(samples / n)["Seed"] for n in ("00002.png", "00003.png")] == ["43", "43"]
    remade = np.asarray(Image.open(samples / "00002.png"))
    np.testing.assert_array_equal(remade, np.asarray(Image.open(samples / "00001.png")))  # bitwise
    np.testing.assert_array_equal(remade, np.asarray(Image.open(samples / "00003.png")))


def test_txt2img_prompt_file_from_stdin_with_a_safetensors_checkpoint(tmp_path, tiny_ckpt):
    from ldm.checkpoint import read_checkpoint, save_checkpoint

    ckpt = save_checkpoint(read_checkpoint(tiny_ckpt).state_dict, tmp_path / "tiny.safetensors")
    prompts = ["one", "two", "", "three", "four", "   ", "five"]
    out = tmp_path / "out"
    proc = run_script("txt2img.py", "--from-file", "-", "--n_samples", "2", "--sampler", "euler", "--skip_grid",
                      "--config", TINY_CONFIG, "--ckpt", ckpt, "--outdir", out, "--no_safety_check", *SMALL,
                      cwd=tmp_path, stdin="\n".join(prompts) + "\n")
    assert_ok(proc)
    files = sorted((out / "samples").iterdir())
    assert len(files) == 5 and not list(out.glob("grid-*.png"))
    meta = [params(p) for p in files]
    assert [m["Prompt"] for m in meta] == ["one", "two", "three", "four", "five"]
    assert [m["Seed"] for m in meta] == ["42", "43", "44", "45", "46"]
    assert meta[0]["Sampler"] == "Euler" and "Eta" not in meta[0] and meta[0]["Model"] == "tiny"


def test_txt2img_safety_checker_replaces_flagged_images_and_encodes_long_prompts(tmp_path, tiny_ckpt):
    from ldm.safety_checker import placeholder_image

    checker = write_checker_folder(tmp_path / "checker", tiny_checker(threshold=-1.5))  # flags everything
    prompt = "a castle " + "very " * 80 + "tall towers"
    out = tmp_path / "out"
    proc = run_script("txt2img.py", "--prompt", prompt, "--n_samples", "1", "--safety_checker", checker,
                      "--config", TINY_CONFIG, "--ckpt", tiny_ckpt, "--outdir", out, *SMALL, cwd=tmp_path)
    assert_ok(proc)
    assert "long prompt: 2 windows" in proc.stderr and "ignored" not in proc.stderr  # nothing cut at 77 tokens
    assert "flagged by the safety checker" in proc.stderr and "00000.png" in proc.stderr
    saved = out / "samples" / "00000.png"
    np.testing.assert_array_equal(np.asarray(Image.open(saved)), np.asarray(placeholder_image(64, 64)))
    assert params(saved)["Safety checker"] == "flagged, replaced by a placeholder"


def test_missing_safety_checker_stops_before_the_model_is_loaded(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    proc = run_script("txt2img.py", "--safety_checker", tmp_path / "nowhere", "--config", TINY_CONFIG,
                      "--ckpt", tiny_ckpt, "--outdir", out, *SMALL, cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "safety checker files not found", "nowhere",
                          "--no_safety_check")
    assert "loading model" not in proc.stderr and not out.exists()


def test_missing_checkpoint_names_the_original_location(tmp_path):
    proc = run_script("txt2img.py", "--config", TINY_CONFIG, "--outdir", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "models/ldm/stable-diffusion-v1/model.ckpt", "not found")
    assert not (tmp_path / "out").exists()


# -- img2img ---------------------------------------------------------------------------------------
def test_img2img_resizes_runs_a_non_ddim_sampler_and_watermarks(tmp_path, tiny_ckpt):
    init = tmp_path / "init.png"
    textured_image(270, 300).convert("P").save(init)  # a palette image; 270x300 -> 256x288
    out = tmp_path / "out"
    proc = run_script("img2img.py", "--init-img", init, "--prompt", "a blue sphere", "--sampler", "dpmpp_2m",
                      "--strength", "0.5", "--ddim_steps", "2", "--n_samples", "1", "--config", TINY_CONFIG,
                      "--ckpt", tiny_ckpt, "--outdir", out, "--no_safety_check", "--device", "cpu", cwd=tmp_path)
    assert_ok(proc)
    assert "resizing 270x300 to 256x288" in proc.stderr
    sample = out / "samples" / "00000.png"
    with Image.open(sample) as im:
        assert im.size == (256, 288)
    meta = params(sample)
    assert (meta["Sampler"], meta["Denoising strength"], meta["CFG scale"], meta["Seed"]) == \
        ("DPM++ 2M", "0.5", "5.0", "42")
    assert meta["Watermark"] == "StableDiffusionV1" and meta["Safety checker"] == "off"
    assert watermark_bits_correct(sample) >= 120 and watermark_bits_correct(out / "grid-0000.png") >= 120


# -- inpaint ---------------------------------------------------------------------------------------
def test_inpaint_text_mode_keeps_unmasked_pixels(tmp_path, tiny_ckpt):
    image, mask = textured_image(64, 64, seed=4), box_mask(64, 64)
    image.save(tmp_path / "room.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    proc = run_script("inpaint.py", "--init-img", tmp_path / "room.png", "--mask", tmp_path / "mask.png", "--prompt",
                      "a window", "--steps", "2", "--config", TINY_CONFIG, "--ckpt", tiny_ckpt, "--outdir", out,
                      "--no_safety_check", "--device", "cpu", cwd=tmp_path)
    assert_ok(proc)
    result = np.asarray(Image.open(out / "samples" / "00000.png"))
    keep = mask < 128
    np.testing.assert_array_equal(result[keep], np.asarray(image)[keep])
    assert (result[~keep] != np.asarray(image)[~keep]).mean() > 0.5
    assert params(out / "samples" / "00000.png")["Prompt"] == "a window"


def test_inpaint_ldm_mode_with_an_indir(tmp_path):
    from ldm.checkpoint import save_checkpoint

    ckpt = save_checkpoint(random_model(TINY_LDM_CONFIG), tmp_path / "last.ckpt")
    indir = tmp_path / "examples"
    indir.mkdir()
    image, mask = textured_image(64, 48, seed=5), box_mask(64, 48)
    image.save(indir / "photo.png")
    Image.fromarray(mask).save(indir / "photo_mask.png")
    out = tmp_path / "results"
    proc = run_script("inpaint.py", "--indir", indir, "--outdir", out, "--steps", "2", "--config", TINY_LDM_CONFIG,
                      "--ckpt", ckpt, "--no_safety_check", "--device", "cpu", cwd=tmp_path)
    assert_ok(proc)
    assert sorted(p.name for p in out.iterdir()) == ["photo.png"]
    result = np.asarray(Image.open(out / "photo.png"))
    keep = mask < 128
    np.testing.assert_array_equal(result[keep], np.asarray(image)[keep])
    meta = params(out / "photo.png")
    assert (meta["Sampler"], meta["Steps"], meta["Seed"], meta["Size"]) == ("DDIM", "2", "42", "64x48")


# -- bad input: one line, exit code 2, no traceback, nothing written -------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    textured_image(64, 64).save(d / "image.png")
    Image.fromarray(box_mask(64, 64)).save(d / "mask.png")
    Image.fromarray(box_mask(32, 64)).save(d / "mask_32x64.png")
    (d / "empty.png").write_bytes(b"")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (d / "blank.txt").write_text("\n   \n\n")
    (d / "a_file").write_text("x")
    (d / "corrupt.ckpt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    return d


MODEL = ["--config", str(TINY_CONFIG)]
BAD = [
    ("txt2img.py", ["--H", "100"], ["--H 100", "multiple of 8"]),
    ("txt2img.py", ["--ddim_steps", "0"], ["--ddim_steps must be at least 1"]),
    ("txt2img.py", ["--ddim_steps", "3"], ["3 steps", "pick another step count"]),
    ("txt2img.py", ["--n_samples", "0"], ["--n_samples must be at least 1"]),
    ("txt2img.py", ["--plms", "--dpm_solver"], ["pick one sampler"]),
    ("txt2img.py", ["--sampler", "euler", "--plms"], ["conflicts"]),
    ("txt2img.py", ["--from-file", "{d}/blank.txt"], ["no prompts"]),
    ("txt2img.py", ["--from-file", "{d}/missing.txt"], ["prompt file", "not found"]),
    ("txt2img.py", ["--outdir", "{d}/a_file/out"], ["is a file", "--outdir"]),
    ("txt2img.py", ["--C", "3"], ["--C 3", "latent channels"]),
    ("txt2img.py", ["--ckpt", "{d}/corrupt.ckpt"], ["corrupt.ckpt", "corrupt"]),
    ("txt2img.py", ["--device", "cuda"], ["CUDA is not available"]),
    ("txt2img.py", ["--precision", "fp16", "--device", "cpu"], ["fp16", "bf16"]),
    ("txt2img.py", ["--laion400m"], ["txt2img-1p4B-eval.yaml", "models/ldm/text2img-large/model.ckpt"]),
    ("txt2img.py", ["--config", "{d}/missing.yaml"], ["missing.yaml", "not found"]),
    ("txt2img.py", ["--config", str(TINY_INPAINT_CONFIG)], ["inpaint"]),
    ("txt2img.py", ["--torchscript"], ["--torchscript", "not supported"]),
    ("txt2img.py", ["--ipex"], ["--ipex", "not supported"]),
    ("txt2img.py", ["--bf16", "--precision", "fp32"], ["--bf16", "conflicts"]),
    ("txt2img.py", ["--repeat", "0"], ["--repeat must be at least 1"]),
    ("img2img.py", ["--init-img", "{d}/image.png", "--strength", "1.5"], ["--strength 1.5", "[0, 1]"]),
    ("img2img.py", ["--init-img", "{d}/image.png", "--strength", "-0.5"], ["--strength -0.5", "[0, 1]"]),
    ("img2img.py", ["--init-img", "{d}/nothere.png"], ["nothere.png", "not found"]),
    ("img2img.py", ["--init-img", "{d}/empty.png"], ["empty"]),
    ("img2img.py", ["--init-img", "{d}/corrupt.png"], ["corrupt.png"]),
    ("img2img.py", [], ["--init-img"]),
    ("inpaint.py", ["--init-img", "{d}/image.png", "--mask", "{d}/mask_32x64.png"], ["32x64", "64x64"]),
    ("inpaint.py", ["--init-img", "{d}/image.png", "--mask", "{d}/empty.png"], ["mask", "empty"]),
    ("inpaint.py", ["--init-img", "{d}/image.png"], ["--mask"]),
    ("inpaint.py", ["--indir", "{d}/nowhere", "--config", str(TINY_LDM_CONFIG)], ["--indir", "not found"]),
    ("inpaint.py", ["--indir", "{d}", "--config", str(TINY_CONFIG)], ["cannot be used for LDM inpainting"]),
    ("inpaint.py", ["--indir", "{d}", "--config", str(TINY_LDM_CONFIG)], ["no *_mask.png files"]),
    ("inpaint.py", ["--indir", "{d}", "--init-img", "{d}/image.png"], ["one mode"]),
]


@pytest.mark.parametrize("script, args, fragments", BAD, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(script, args, fragments, inputs, tiny_ckpt, tmp_path, capsys):
    args = [a.format(d=inputs) for a in args]
    argv = [*([] if "--config" in args else MODEL), *([] if "--ckpt" in args else ["--ckpt", str(tiny_ckpt)]),
            *([] if "--outdir" in args else ["--outdir", str(tmp_path / "out")]), "--no_safety_check", *args]
    code = load_main(script)(argv)
    assert_one_line_error(code, capsys.readouterr().err, *fragments)
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_does_not_match_the_config(tmp_path, tiny_ckpt, inputs, capsys):
    code = load_main("inpaint.py")(["--init-img", str(inputs / "image.png"), "--mask", str(inputs / "mask.png"),
                                    "--config", str(TINY_INPAINT_CONFIG), "--ckpt", str(tiny_ckpt), "--outdir",
                                    str(tmp_path / "out"), "--no_safety_check", "--steps", "2"])
    assert_one_line_error(code, capsys.readouterr().err, "does not match the model config", "wrong shape")
    assert not (tmp_path / "out").exists()


def test_bad_input_in_a_real_process(tmp_path, inputs):
    proc = run_script("img2img.py", "--init-img", inputs / "image.png", "--strength", "2", cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "--strength 2.0", "[0, 1]")


def test_the_sd2_scripts_flags_steps_dpm_repeat(tmp_path, tiny_ckpt, capsys):
    """--steps (alias of --ddim_steps), --dpm (of --dpm_solver) and --repeat as the SD 2 scripts had them."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "out"
    code = load_main("txt2img.py")(["--from-file", str(prompts), "--repeat", "2", "--n_samples", "4", "--n_iter", "1",
                                    "--steps", "2", "--dpm", "--H", "64", "--W", "64", "--config", str(TINY_CONFIG),
                                    "--ckpt", str(tiny_ckpt), "--outdir", str(out), "--no_safety_check",
                                    "--device", "cpu", "--skip_grid"])
    assert code == 0, capsys.readouterr().err
    meta = [params(p) for p in sorted((out / "samples").iterdir())]
    assert [m["Prompt"] for m in meta] == ["a red cube", "a red cube", "a blue ball", "a blue ball"]
    assert {(m["Steps"], m["Sampler"]) for m in meta} == {("2", "DPM-Solver++ 2M (time uniform)")}
