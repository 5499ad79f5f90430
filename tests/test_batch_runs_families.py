"""Batch runs of the family scripts (ldm/cli/batch.py): ``upscale.py`` on the tiny x4 upscaler and
``sample_class.py`` on the tiny class-conditional LDM run through the same items, journal, torchrun
sharding and ``--resume`` as txt2img (tests/test_batch_runs.py): a 2-process run (gloo) writes
the folder of a 1-process run byte for byte, in other batch compositions (``--n_samples 2``: one
process batches images 0+1, 2+3, ...; two processes 0+2 and 1+3, ...), and a run interrupted
(SIGKILL of every process; Ctrl-C) resumes, with another number of processes, to that folder.

The runs are real processes started as a user starts them (``python -m torch.distributed.run``),
through a small launcher that registers the fixtures' tiny open_clip arch (the x4 fixture's text
encoder) and, for the interrupted runs, waits a while before each batch (the tiny models make an
image in a tenth of a second: too fast to stop half-way otherwise; the images do not change).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FIXTURES, TINY_CKPT
from tests.helpers import REPO, TINY_CONFIG
from tests.test_batch_runs import (_running, _workers, assert_same_folder, env, folder_bytes, item_lines,
                                  journal_lines, wait_for_images)
from tests.test_scripts import assert_one_line_error, load_main, restore_logging  # noqa: F401 (autouse fixture)
from tests.test_sd_x4_upscaler import x4_files  # noqa: F401 (fixture: the tiny x4 checkpoint as a file)

CIN_CONFIG, CIN_CKPT = FIXTURES / "ldm-cin-tiny.yaml", FIXTURES / "ldm-cin-tiny-random.ckpt"
COMMON = ["--device", "cpu", "--precision", "fp32", "--n_samples", "2"]

LAUNCHER = '''
import json, os, runpy, sys, time
from pathlib import Path

from ldm.modules.encoders.open_clip import register_open_clip_arch

fixtures = Path(sys.argv.pop(1))
register_open_clip_arch("ldmtest-tiny-ViT-H-14", json.loads((fixtures / "ldmtest-tiny-ViT-H-14.json").read_text()))
delay = float(os.environ.get("BATCH_TEST_DELAY", "0"))
if delay:
    import ldm.batch

    run_items = ldm.batch.run_items

    def slow_run_items(job, render, writer):
        def slow_render(items):
            time.sleep(delay)
            return render(items)
        return run_items(job, slow_render, writer)

    ldm.batch.run_items = slow_run_items
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
'''


@pytest.fixture(scope="module")
def inputs(spec_dir, tmp_path_factory, x4_files) -> dict:  # noqa: F811
    """The launcher, a prompt file, a low-resolution image, and each script's flags."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "launch.py").write_text(LAUNCHER)
    (folder / "prompts.txt").write_text("a cat\na dog\na red cube\na blue ball\n")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(folder / "low.png")
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(folder / "other.png")
    config, ckpt = x4_files
    return {"folder": folder,
            # 4 prompts x 2 iterations: 8 images of 80x64, 4 steps
            "upscale.py": ["--init-img", folder / "low.png", "--from-file", folder / "prompts.txt", "--n_iter", "2",
                           "--steps", "4", "--noise_level", "30", "--config", config, "--ckpt", ckpt,
                           "--no_safety_check", *COMMON],
            # 3 classes x 2 samples x 2 iterations: 12 images of 16x16, 2 steps
            "sample_class.py": ["--classes", "25", "birdhouse", "992", "--n_iter", "2", "--ddim_steps", "2", "--H",
                                "16", "--W", "16", "--seed", "5", "--config", CIN_CONFIG, "--ckpt", CIN_CKPT, *COMMON]}


N_IMAGES = {"upscale.py": 8, "sample_class.py": 12}


def command(inputs: dict, script: str, nproc: int, outdir: Path, *extra) -> list:
    args = [str(inputs["folder"] / "launch.py"), str(FIXTURES), str(REPO / "scripts" / script),
            *map(str, inputs[script]), "--outdir", str(outdir), *map(str, extra)]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def run(inputs: dict, script: str, nproc: int, outdir: Path, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(inputs, script, nproc, outdir, *extra), env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory) -> dict:
    """One uninterrupted single-process run of each script."""
    refs = {}
    for script in N_IMAGES:
        refs[script] = tmp_path_factory.mktemp("reference") / "out"
        run(inputs, script, 1, refs[script])
    return refs


def test_one_process_runs_are_journaled_by_item(references):
    ref = references["upscale.py"]
    assert sorted(folder_bytes(ref)) == ["grid-0000.png"] + [f"samples/{k:05}.png" for k in range(8)]
    lines = item_lines(ref)
    # image k: prompt k mod 4 (two iterations over the file), seed 0 + k, 4x the input
    assert [o["prompt"] for o in lines] == ["a cat", "a dog", "a red cube", "a blue ball"] * 2
    assert [o["seed"] for o in lines] == list(range(8))
    assert {(o["record"]["width"], o["record"]["height"], o["record"]["extra"]["Noise level"]) for o in lines} == \
        {(80, 64, 30)}
    header = next(o for o in journal_lines(ref) if "item" not in o)
    assert header["settings"]["method"] == "upscale" and header["settings"]["noise_level"] == 30
    assert header["settings"]["init_image"].startswith("20x16:RGB:")

    ref = references["sample_class.py"]
    lines = item_lines(ref)
    # per iteration: each class --n_samples times; the journal's prompt is the class as given
    assert [o["prompt"] for o in lines] == ["25", "25", "birdhouse", "birdhouse", "992", "992"] * 2
    assert [o["seed"] for o in lines] == [5 + k for k in range(12)]
    assert [o["record"]["extra"]["Class"] for o in lines[:6]] == [25, 25, 448, 448, 992, 992]
    header = next(o for o in journal_lines(ref) if "item" not in o)
    assert header["settings"]["classes"] == [25, 448, 992] and header["settings"]["method"] == "sample_class"


@pytest.mark.parametrize("script", sorted(N_IMAGES))
def test_two_processes_make_the_same_folder(inputs, references, tmp_path, script):
    outdir = tmp_path / "out"
    run(inputs, script, 2, outdir)
    assert_same_folder(outdir, references[script])
    per_rank = json.loads((outdir / "summary.json").read_text())["runs"]["0"]["sessions"][0]["per_rank"]
    half = N_IMAGES[script] // 2
    assert [(r["rank"], r["done"], r["failed"]) for r in per_rank] == [(0, half, 0), (1, half, 0)]


def _interrupt(inputs: dict, script: str, outdir: Path, how: str) -> None:
    """Start a run that waits 1.5 s before each batch; once it has journaled images, SIGKILL its
    launcher and both workers (``how="kill"``, 2 processes) or Ctrl-C it (``"sigint"``, 1 process)."""
    nproc = 2 if how == "kill" else 1
    proc = subprocess.Popen(command(inputs, script, nproc, outdir), env={**env(), "BATCH_TEST_DELAY": "1.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_images(proc, outdir)
    if how == "sigint":  # the batch in progress is finished and saved, then it stops
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert "--resume" in err
        return
    workers = _workers(proc.pid)
    for pid in [*workers.values(), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    for pid in workers.values():
        while _running(pid):
            time.sleep(0.05)


@pytest.mark.parametrize("script, how, resume_nproc", [("upscale.py", "kill", 1), ("sample_class.py", "sigint", 2)])
def test_interrupted_run_resumes_to_the_same_folder(inputs, references, tmp_path, capsys, script, how, resume_nproc):
    outdir = tmp_path / "out"
    _interrupt(inputs, script, outdir, how)
    reference = references[script]
    done = item_lines(outdir)
    assert 2 <= len(done) < N_IMAGES[script], "the run was to be stopped half-way"
    before = folder_bytes(outdir)
    assert all(name.startswith("samples/") for name in before)  # complete images only: no grid, no temporary
    for o in done:
        assert before[o["file"]] == (reference / o["file"]).read_bytes()

    main = load_main(script)
    args = [str(a) for a in inputs[script]] + ["--outdir", str(outdir)]
    if script == "upscale.py":  # another init image: the settings differ (its pixels' hash), one line
        other = list(args)
        other[other.index("--init-img") + 1] = str(inputs["folder"] / "other.png")
        assert_one_line_error(main([*other, "--resume"]), capsys.readouterr().err, "settings differ", "init_image")
    else:  # another class list
        other = list(args)
        other[other.index("birdhouse")] = "agaric"
        assert_one_line_error(main([*other, "--resume"]), capsys.readouterr().err, "settings differ", "classes")
    assert_one_line_error(main(args), capsys.readouterr().err, "unfinished run", "--resume")
    assert folder_bytes(outdir) == before

    run(inputs, script, resume_nproc, outdir, "--resume")
    assert_same_folder(outdir, reference)


def test_upscale_takes_a_job_file(inputs, tmp_path, capsys):
    """Per-line prompt, seed, steps and n; the size comes from the input image, so "H" is refused
    (with its line number, before anything is written)."""
    jobs = tmp_path / "jobs.jsonl"
    base = [str(a) for a in inputs["upscale.py"]]
    base = base[:base.index("--from-file")] + base[base.index("--from-file") + 2:]
    jobs.write_text('{"prompt": "a cat", "seed": 100, "n": 2}\n\n{"prompt": "a dog", "steps": 3, "H": 64}\n')
    code = load_main("upscale.py")([*base, "--from-file", str(jobs), "--outdir", str(tmp_path / "bad")])
    assert_one_line_error(code, capsys.readouterr().err, "line 3", 'unknown key "H"', "input image")
    assert not (tmp_path / "bad").exists()

    jobs.write_text('{"prompt": "a cat", "seed": 100, "n": 2}\n{"prompt": "a dog", "steps": 5}\n')
    out = tmp_path / "out"
    assert load_main("upscale.py")([*base, "--n_iter", "1", "--from-file", str(jobs), "--outdir", str(out)]) == 0
    lines = item_lines(out)
    assert [(o["prompt"], o["seed"], o["record"]["steps"]) for o in lines] == \
        [("a cat", 100, 4), ("a cat", 101, 4), ("a dog", 2, 5)]


def test_inpaint_job_file_lines_are_checked_before_anything_runs(tmp_path, capsys):
    """inpaint.py (text-guided) reads JSONL job files too; its size comes from the init image."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a red cube"}\n{"prompt": "a blue ball", "W": 64}\n')
    code = load_main("inpaint.py")(["--init-img", str(REPO / "assets/demo/init.png"), "--mask",
                                    str(REPO / "assets/demo/mask.png"), "--from-file", str(jobs), "--outdir",
                                    str(tmp_path / "out"), "--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT),
                                    "--device", "cpu", "--no_safety_check"])
    assert_one_line_error(code, capsys.readouterr().err, "line 2", 'unknown key "W"')
    assert not (tmp_path / "out").exists()


def test_ldm_inpainting_refuses_resume(tmp_path, capsys):
    code = load_main("inpaint.py")(["--indir", str(tmp_path), "--outdir", str(tmp_path / "out"), "--resume"])
    assert_one_line_error(code, capsys.readouterr().err, "--indir", "drop --resume")
