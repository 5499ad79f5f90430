"""Batch runs (ldm/batch): torchrun with 2 CPU processes (gloo) against one process, killed runs
resumed, JSONL job files; the demo model at 64x64, few steps, 8 images a run.

Runs are real processes started as a user starts them (``python -m torch.distributed.run``);
input errors are checked in-process through the script's ``main(argv)``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm.metadata import parse_parameters, read_parameters
from tests.helpers import DEMO_CONFIG, DEMO_WEIGHTS, REPO
from tests.test_scripts import assert_one_line_error, load_main, restore_logging  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="the demo model is not in models/demo")

PROMPTS = ["a red cube", "a blue ball", "a green cone", "a yellow ring"]
# 4 prompts x 2 iterations, one image per batch (so images are journaled one by one), 10 DDIM steps
ARGS = ["--n_samples", "1", "--n_iter", "2", "--ddim_steps", "10", "--config", DEMO_CONFIG, "--ckpt", DEMO_WEIGHTS,
        "--device", "cpu", "--precision", "fp32"]
N_IMAGES = 8
RUN_FILES = ("journal.jsonl", "summary.json")


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def command(nproc: int, *args) -> list:
    script = str(REPO / "scripts" / "txt2img.py")
    if nproc == 1:
        return [sys.executable, script, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script,
            *map(str, args)]


def run(nproc: int, outdir: Path, prompts: Path, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(nproc, "--from-file", prompts, "--outdir", outdir, *ARGS, *extra), env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return proc


def journal_lines(outdir: Path) -> list:
    return [json.loads(line) for line in (outdir / "journal.jsonl").read_text().splitlines() if line.strip()]


def item_lines(outdir: Path) -> list:
    """The journal's image lines without their time stamps, by item."""
    lines = [{k: v for k, v in obj.items() if k != "time"} for obj in journal_lines(outdir) if "item" in obj]
    return sorted(lines, key=lambda obj: obj["item"])


def folder_bytes(outdir: Path) -> dict:
    """Every file but the journal and the summary, by relative path."""
    return {p.relative_to(outdir).as_posix(): p.read_bytes() for p in sorted(outdir.rglob("*"))
            if p.is_file() and p.name not in RUN_FILES}


def assert_same_folder(outdir: Path, reference: Path) -> None:
    files = folder_bytes(outdir)
    assert sorted(files) == sorted(folder_bytes(reference))  # no extra file, no "-1" copy, no temporary
    for name, data in folder_bytes(reference).items():
        assert files[name] == data, f"{name} differs"
    assert item_lines(outdir) == item_lines(reference)
    header, ref_header = (next(o for o in journal_lines(d) if "item" not in o) for d in (outdir, reference))
    for key in ("settings_hash", "settings", "items", "first_number"):
        assert header[key] == ref_header[key]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prompts) -> Path:
    """One uninterrupted single-process run."""
    outdir = tmp_path_factory.mktemp("reference") / "out"
    run(1, outdir, prompts)
    return outdir


def test_one_process_run_layout_and_journal(reference):
    names = sorted(folder_bytes(reference))
    assert names == ["grid-0000.png"] + [f"samples/{k:05}.png" for k in range(N_IMAGES)]
    lines = item_lines(reference)
    assert [o["item"] for o in lines] == list(range(N_IMAGES))
    # image k: prompt k mod 4 (two iterations over the file), seed 42 + k, its file and that file's hash
    assert [o["prompt"] for o in lines] == PROMPTS * 2
    assert [o["seed"] for o in lines] == [42 + k for k in range(N_IMAGES)]
    import hashlib

    for o in lines:
        data = (reference / o["file"]).read_bytes()
        assert o["sha256"] == hashlib.sha256(data).hexdigest()
        meta = parse_parameters(read_parameters(reference / o["file"]))
        assert (meta["Seed"], meta["Prompt"]) == (str(o["seed"]), o["prompt"])
    summary = json.loads((reference / "summary.json").read_text())["runs"]["0"]
    assert summary["complete"] and summary["done"] == N_IMAGES and summary["grid"] == "grid-0000.png"
    assert summary["sessions"][0]["per_rank"][0]["done"] == N_IMAGES


def test_two_processes_make_the_same_folder(tmp_path, prompts, reference):
    outdir = tmp_path / "out"
    proc = run(2, outdir, prompts)
    assert_same_folder(outdir, reference)
    per_rank = json.loads((outdir / "summary.json").read_text())["runs"]["0"]["sessions"][0]["per_rank"]
    assert [(r["rank"], r["done"], r["failed"]) for r in per_rank] == [(0, 4, 0), (1, 4, 0)]
    assert "[rank 1/2]" in proc.stderr and "[rank 0/2]" in proc.stderr


def _start_and_kill(outdir: Path, prompts: Path, which: str) -> None:
    """Start a 2-process run; after two images are journaled SIGKILL rank 1 (``which="one"``) or
    every process (``"all"``); or start one process and Ctrl-C it (``"sigint"``). Wait until
    nothing of it runs any more."""
    proc = subprocess.Popen(command(1 if which == "sigint" else 2, "--from-file", prompts, "--outdir", outdir, *ARGS),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_images(proc, outdir)
    if which == "sigint":  # the images in progress are finished and saved, then it stops
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert "SIGINT: finishing the image(s) in progress" in err and "--resume" in err
        return
    workers = _workers(proc.pid)
    if which == "all":  # the workers (torchrun starts them in their own sessions) and the launcher
        for pid in [*workers.values(), proc.pid]:
            os.kill(pid, signal.SIGKILL)
    else:
        os.kill(workers[1], signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    for pid in workers.values():  # wait until none of them runs any more
        while _running(pid):
            time.sleep(0.05)


def wait_for_images(proc: subprocess.Popen, outdir: Path, count: int = 2) -> None:
    """Wait until the run ``proc`` has journaled ``count`` images in ``outdir`` (or fail)."""
    journal = outdir / "journal.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if journal.is_file() and journal.read_text().count('"item"') >= count:
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the run journaled no images in time")


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _workers(launcher: int) -> dict:
    """``{rank: pid}`` of the launcher's worker processes."""
    workers = {}
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        for entry in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"RANK="):
                workers[int(entry[5:])] = int(child)
    assert sorted(workers) == [0, 1], workers
    return workers


@pytest.mark.parametrize("which, resume_nproc", [("one", 2), ("all", 1), ("sigint", 2)])
def test_killed_run_resumes_to_the_same_folder(tmp_path, prompts, reference, which, resume_nproc, capsys):
    outdir = tmp_path / "out"
    _start_and_kill(outdir, prompts, which)
    done = item_lines(outdir)
    assert 2 <= len(done) < N_IMAGES, "the run was to be killed half-way"
    before = {name: data for name, data in folder_bytes(outdir).items()}
    assert all(name.startswith("samples/") for name in before)  # complete files only: no grid, no temporary
    for o in done:
        assert before[o["file"]] == (reference / o["file"]).read_bytes()

    # the same command again without --resume: one line saying to pass it; nothing written
    main = load_main("txt2img.py")
    code = main(["--from-file", str(prompts), "--outdir", str(outdir), *map(str, ARGS)])
    assert_one_line_error(code, capsys.readouterr().err, "unfinished run", "--resume", "another --outdir")
    # --resume with other settings: one line, nothing written
    changed = [str(a) for a in ARGS]
    changed[changed.index("--ddim_steps") + 1] = "12"
    code = main(["--from-file", str(prompts), "--outdir", str(outdir), "--resume", *changed])
    assert_one_line_error(code, capsys.readouterr().err, "--resume", "settings differ", "steps")
    assert folder_bytes(outdir) == before

    run(resume_nproc, outdir, prompts, "--resume")
    assert_same_folder(outdir, reference)
    for name, data in before.items():  # nothing overwritten
        assert (outdir / name).read_bytes() == data
    items = [o["item"] for o in journal_lines(outdir) if "item" in o]
    assert sorted(items) == list(range(N_IMAGES))  # every image journaled once
    sessions = json.loads((outdir / "summary.json").read_text())["runs"]["0"]["sessions"]
    assert sessions[-1]["world_size"] == resume_nproc
    assert sum(r["done"] for r in sessions[-1]["per_rank"]) == N_IMAGES - len(done)


def test_a_second_run_into_a_finished_folder_continues_the_numbers(tmp_path, prompts, reference, capsys):
    main = load_main("txt2img.py")
    outdir = tmp_path / "out"
    args = ["--prompt", "a red cube", "--outdir", str(outdir), "--n_samples", "2", "--n_iter", "1", "--ddim_steps",
            "4", "--config", str(DEMO_CONFIG), "--ckpt", str(DEMO_WEIGHTS), "--device", "cpu"]
    assert main(args) == 0
    assert main(args + ["--seed", "7"]) == 0
    assert sorted(folder_bytes(outdir)) == ["grid-0000.png", "grid-0001.png"] + \
        [f"samples/{k:05}.png" for k in range(4)]
    assert [(o["run"], o["item"], o["file"]) for o in item_lines(outdir)] == \
        [(0, 0, "samples/00000.png"), (1, 0, "samples/00002.png"), (0, 1, "samples/00001.png"),
         (1, 1, "samples/00003.png")]
    # --resume of a finished run with the same flags: nothing to do, nothing written
    before = folder_bytes(outdir)
    assert main(args + ["--seed", "7", "--resume"]) == 0
    assert folder_bytes(outdir) == before


BAD_LINES = [
    ('{"prompt": "a cube", "steps": "ten"}', '"steps" must be an integer'),
    ('{"prompt": "a cube", "colour": "red"}', 'unknown key "colour"'),
    ('{"prompt": ""}', '"prompt" is missing'),
    ('{"prompt": "a cube", "W": 98}', '"W" 98 is not a multiple of 4'),  # the demo model: f=4
    ('{"prompt": "a cube", "sampler": "nope"}', "nope"),
    ('{"prompt": "a cube", "steps": 3}', "3"),
    ('["a cube"]', "expected a JSON object"),
    ('{"prompt": "a cube",', "not valid JSON"),
]


@pytest.mark.parametrize("line, fragment", BAD_LINES)
def test_jsonl_bad_line_names_its_number_and_writes_nothing(tmp_path, line, fragment, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a red cube", "seed": 5}\n\n' + line + '\n{"prompt": "a blue ball"}\n')
    outdir = tmp_path / "out"
    code = load_main("txt2img.py")(["--from-file", str(jobs), "--outdir", str(outdir), *map(str, ARGS)])
    assert_one_line_error(code, capsys.readouterr().err, "line 3:", fragment)
    assert not outdir.exists()


def test_jsonl_job_file_per_line_settings(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "a red cube", "seed": 100, "n": 2},
        {"prompt": "a blue ball", "negative_prompt": "blurry", "steps": 4, "scale": 3.0, "sampler": "euler",
         "H": 64, "W": 128},
        {"prompt": "a green cone"},
    ]) + "\n")
    outdir = tmp_path / "out"
    code = load_main("txt2img.py")(["--from-file", str(jobs), "--outdir", str(outdir), "--n_samples", "4",
                                    "--n_iter", "2", "--ddim_steps", "2", "--config", str(DEMO_CONFIG), "--ckpt",
                                    str(DEMO_WEIGHTS), "--device", "cpu"])
    assert code == 0
    meta = [parse_parameters(read_parameters(outdir / o["file"])) for o in item_lines(outdir)]
    got = [(m["Prompt"], m["Seed"], m["Steps"], m["Sampler"], m["CFG scale"], m["Size"], m["Negative prompt"])
           for m in meta]
    ball = ("a blue ball", "4", "Euler", "3.0", "128x64", "blurry")
    assert got == [("a red cube", "100", "2", "DDIM", "7.5", "64x64", ""), ("a red cube", "101", "2", "DDIM", "7.5",
                                                                             "64x64", ""),
                   (ball[0], "44") + ball[1:], ("a green cone", "45", "2", "DDIM", "7.5", "64x64", ""),
                   # iteration 2: a line's own seed goes on (seed + i * n + j), the others count on
                   ("a red cube", "102", "2", "DDIM", "7.5", "64x64", ""), ("a red cube", "103", "2", "DDIM", "7.5",
                                                                            "64x64", ""),
                   (ball[0], "48") + ball[1:], ("a green cone", "49", "2", "DDIM", "7.5", "64x64", "")]
    assert not list(outdir.glob("grid-*.png"))  # images of different sizes: no grid


# -- in-process: the runner with a stand-in renderer -----------------------------------------------
def _fake_job(outdir: Path, n: int, resume: bool = False):
    from ldm.batch import BatchJob, DistContext, prepare
    from ldm.batch.items import WorkItem

    items = [WorkItem(k, f"prompt {k}", 10 + k, "", 2, "ddim", 7.5, None, 8, 8) for k in range(n)]
    job = BatchJob(outdir=outdir, sample_dir=outdir / "samples", items=items, settings={"n": n}, ctx=DistContext(),
                   batch_size=2, grid_rows=2)
    return prepare(job, resume=resume, save_samples=True)


def _fake_render(fail_seeds=()):
    import numpy as np
    from PIL import Image

    from ldm.generate.records import GenerationError, GenerationResult, ImageRecord

    def render(items):
        if any(i.seed in fail_seeds for i in items):
            raise GenerationError("sampling produced NaN/inf latents (numeric overflow); run again with --precision "
                                  "fp32 (or bf16)")
        images = [Image.fromarray(np.full((8, 8, 3), i.seed, np.uint8)) for i in items]
        records = [ImageRecord("txt2img", i.prompt, "", i.seed, "ddim", 2, 7.5, 8, 8) for i in items]
        return GenerationResult(images, records)
    return render


def test_failed_images_are_listed_and_made_by_resume(tmp_path):
    from ldm.batch import run_items
    from ldm.errors import UserInputError
    from ldm.generate import ImageWriter

    outdir = tmp_path / "out"
    job = _fake_job(outdir, 5)
    with pytest.raises(UserInputError, match=r"2 of 5 images failed \(sampling produced NaN.*--resume"):
        run_items(job, _fake_render(fail_seeds={12}), ImageWriter(outdir))
    summary = json.loads((outdir / "summary.json").read_text())["runs"]["0"]
    assert (summary["done"], summary["complete"], summary["grid"]) == (3, False, None)
    assert [f["item"] for f in summary["sessions"][0]["failures"]] == [2, 3]  # the batch of items 2 and 3
    assert sorted(p.name for p in (outdir / "samples").iterdir()) == ["00000.png", "00001.png", "00004.png"]

    job = _fake_job(outdir, 5, resume=True)
    summary = run_items(job, _fake_render(), ImageWriter(outdir))
    assert (summary["done"], summary["complete"], summary["grid"]) == (5, True, "grid-0000.png")
    assert [r["done"] for r in summary["sessions"][-1]["per_rank"]] == [2]
    assert sorted(o["item"] for o in item_lines(outdir)) == list(range(5))


def test_journal_survives_a_torn_last_line_and_numbers_follow_existing_files(tmp_path):
    from ldm.batch.journal import append_line, next_number, read_journal

    folder = tmp_path / "samples"
    folder.mkdir()
    for name in ("00000.png", "00007.png", "00003-1.png", "notes.txt", ".hidden"):
        (folder / name).write_bytes(b"x")
    assert next_number(folder) == 8  # after the highest number, never onto a taken name
    assert next_number(tmp_path / "none") == 0
    journal = tmp_path / "journal.jsonl"
    append_line(journal, {"run": 0, "items": 2, "settings_hash": "h", "first_number": 0})
    with open(journal, "a") as f:
        f.write('{"run": 0, "item": 0, "fi')  # a write cut short
    append_line(journal, {"run": 0, "item": 1, "file": "samples/00001.png"})
    (run,) = read_journal(journal)
    assert sorted(run.done) == [1] and not run.complete
