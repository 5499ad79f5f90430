"""The CompVis latent-diffusion text-to-image (BERT) and unconditional models, against the
numbers the original code recorded (``../shared/spec/ldm-family.md``, fixtures ``ldm-txt2img-tiny``
and ``ldm-uncond-tiny``): the WordPiece tokenizer (ids exactly, and against ``BertTokenizerFast``
on the same vocabulary), the BERT encoder, UNet, VAE, the DDIM/PLMS traces, the 50-step eta-1
unconditional DDIM run with every noise draw; the full-size layouts on ``meta``; the families;
``scripts/sample_diffusion.py`` and ``scripts/txt2img.py`` end to end on the tiny configs."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.errors import UserInputError
from ldm.modules.encoders.wordpiece import DEFAULT_BERT_VOCAB, WordPieceTokenizer, find_bert_vocab
from tests.conftest import FIXTURES
from tests.helpers import REPO, help_entries, read_manifest, rel_err
from tests.test_scripts import assert_ok, assert_one_line_error, load_main, params, run_script

VOCAB = FIXTURES / "ldm-txt2img-tiny-vocab.txt"
TXT_CONFIG, TXT_CKPT = FIXTURES / "ldm-txt2img-tiny.yaml", FIXTURES / "ldm-txt2img-tiny-random.ckpt"
UNC_CONFIG, UNC_CKPT = FIXTURES / "ldm-uncond-tiny.yaml", FIXTURES / "ldm-uncond-tiny-random.ckpt"


def _parity(name: str) -> dict:
    path = FIXTURES / f"{name}-parity.pt"
    if not path.is_file():
        pytest.skip(f"fixture {path} not found (set SD_SPEC_DIR)")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def txt():
    return _parity("ldm-txt2img-tiny")


@pytest.fixture(scope="module")
def unc():
    return _parity("ldm-uncond-tiny")


def _load(config_path, ckpt, **params_):
    from ldm.checkpoint import load_model_from_config

    cfg = OmegaConf.load(config_path)
    for key, value in params_.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return load_model_from_config(cfg, ckpt, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def txt_model(txt):
    return _load(TXT_CONFIG, TXT_CKPT, **{"model.params.cond_stage_config.params.vocab_file": str(VOCAB)})


@pytest.fixture(scope="module")
def unc_model(unc):
    return _load(UNC_CONFIG, UNC_CKPT)


# -- tokenizer ---------------------------------------------------------------------------------------
def test_tokenizer_ids_equal_reference(txt):
    ref = txt["tokenizer"]
    tok = WordPieceTokenizer(VOCAB)
    assert len(tok) == ref["vocab_size"] == 371
    batch = tok(ref["prompts"])
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert [tok.decode(ids) for ids in batch.input_ids] == ref["tokens"]
    # truncation keeps [CLS] + 75 tokens + [SEP] and reports the rest; padding is [PAD] = 0
    assert batch.lengths[4] == 77 and batch.dropped[4].startswith("prompt number 8")
    assert batch.lengths[2] == 2 and batch.input_ids[2, 2:].eq(0).all() and not any(batch.dropped[:4])


def _random_texts(n: int, seed: int = 0) -> list:
    words = [w for w in VOCAB.read_text(encoding="utf-8").split("\n") if w and not w.startswith(("[", "##"))]
    pool = list("abcxyz AÉÎõüßİı.,;:!?\"'()[]{}<>$+=^`|~@#%&*-_/\\\t\n\r\x0b\x0c\x00\ufffd\u200b\u00a0\u2028\u3000"
                "\u0085東京人。、「」🎉🥰🫠👍🏽é\u0301ǅﬁ①²½Ⅷ\u0300\ue000")
    pool += ["[MASK]", "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[mask]", "[MASK", "##ing", "ing", "astronaut"]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            parts.append(rng.choice(words) if rng.random() < 0.5 else rng.choice(pool))
            if rng.random() < 0.5:
                parts.append(" ")
        texts.append("".join(parts))
    return texts + ["x" * 100, "x" * 101, "a" * 99 + "é", " ".join(["word"] * 200), "", "   "]


def test_tokenizer_equals_bert_tokenizer_fast_on_the_same_vocabulary():
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast(str(VOCAB), do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None)
    tok = WordPieceTokenizer(VOCAB)
    texts = _random_texts(1500)
    ours = tok(texts).input_ids
    theirs = hf(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    bad = [t for t, a, b in zip(texts, ours, theirs) if not torch.equal(a, b)]
    assert not bad, bad[:3]
    assert ours[:, 0].eq(101).all() and (ours == 103).any()  # [CLS] first; a verbatim [MASK] stays one token
    assert (ours == 100).any() and (ours[:, -1] == 102).any()  # unknown words; truncated prompts end in [SEP]


def test_missing_or_wrong_vocabulary_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDM_BERT_VOCAB", raising=False)
    with pytest.raises(UserInputError, match="models/ldm/text2img-large/vocab.txt or pass --bert_vocab PATH"):
        find_bert_vocab()
    assert DEFAULT_BERT_VOCAB == "models/ldm/text2img-large/vocab.txt"
    (tmp_path / "models/ldm/text2img-large").mkdir(parents=True)
    (tmp_path / DEFAULT_BERT_VOCAB).write_text("[PAD]\nhello\n")
    assert find_bert_vocab().resolve() == (tmp_path / DEFAULT_BERT_VOCAB).resolve()
    monkeypatch.setenv("LDM_BERT_VOCAB", str(VOCAB))
    assert find_bert_vocab() == VOCAB and find_bert_vocab(tmp_path / DEFAULT_BERT_VOCAB).name == "vocab.txt"
    monkeypatch.delenv("LDM_BERT_VOCAB")
    with pytest.raises(UserInputError, match=r"lacks the special token\(s\) \[UNK\]"):
        WordPieceTokenizer(find_bert_vocab())


# -- the BERT encoder, UNet and VAE of text2img-large ----------------------------------------------------
def test_bert_embedder_matches_reference(txt, txt_model):
    ref = txt["bert"]
    enc = txt_model.cond_stage_model
    with torch.no_grad():
        assert torch.equal(enc.tokenize(ref["prompts"]).input_ids, ref["input_ids"])
        emb = enc.transformer.token_emb(ref["input_ids"]) + enc.transformer.pos_emb(ref["input_ids"])
        assert rel_err(emb, ref["emb"]) < 1e-6
        pre_norm, hiddens = enc.transformer.attn_layers(ref["emb"], return_hiddens=True)
        assert len(hiddens) == len(ref["hiddens"]) == 2
        for mine, theirs in zip(hiddens, ref["hiddens"]):
            assert rel_err(mine, theirs) < 1e-5
        assert rel_err(pre_norm, ref["pre_norm"]) < 1e-5
        assert rel_err(txt_model.get_learned_conditioning(ref["prompts"]), ref["c"]) < 1e-5
        assert rel_err(txt_model.get_learned_conditioning([""]), ref["uc"]) < 1e-5
        assert rel_err(txt_model.get_learned_conditioning(ref["extra_prompts"]), ref["extra_c"]) < 1e-5


def test_bert_embedder_without_vocabulary_builds_but_names_the_file(tmp_path, monkeypatch):
    from ldm.modules.encoders.modules import BERTEmbedder

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDM_BERT_VOCAB", raising=False)
    enc = BERTEmbedder(n_embed=32, n_layer=1, vocab_size=371)  # no file needed to build (e.g. on meta)
    with pytest.raises(UserInputError, match="bert-base-uncased vocabulary"):
        enc(["a prompt"])
    ids = torch.tensor([[101, 146, 102] + [0] * 74])
    assert BERTEmbedder(32, 1, 371, use_tokenizer=False)(ids).shape == (1, 77, 32)  # layout2img: ids in


def test_unet_and_vae_match_reference(txt, txt_model):
    from tests.helpers import unet_block_outputs

    ref, vae = txt["unet"], txt["vae"]
    with torch.no_grad():
        assert rel_err(txt_model.apply_model(ref["x"], ref["t"], ref["context"]), ref["eps"]) < 1e-5
        assert rel_err(txt_model.apply_model(ref["x"], ref["t"], ref["context_uncond"]), ref["eps_uncond"]) < 1e-5
        blocks = unet_block_outputs(txt_model.model.diffusion_model, ref["x"], ref["t"], ref["context"])
        for name, value in ref["blocks"].items():
            assert rel_err(blocks[name], value) < 1e-5, name
        moments = txt_model.first_stage_model.encode(vae["x"])
        assert rel_err(moments.mode(), vae["mode"]) < 1e-5
        assert rel_err(txt_model.decode_first_stage(vae["z_scaled"]), vae["decoded"]) < 1e-5


@pytest.mark.parametrize("name", ["ddim", "plms"])
def test_txt2img_sampler_traces_match_reference(txt, txt_model, name):
    from ldm.models.diffusion.registry import make_sampler
    from tests.helpers import Recorder

    ref = txt["sample"]
    rec = ref[name]
    model = Recorder(txt_model)
    pred_x0 = []
    with torch.no_grad():
        out, _ = make_sampler(name, model).sample(
            ref["S"], ref["n_samples"], ref["shape"], conditioning=ref["c"], unconditional_conditioning=ref["uc"],
            unconditional_guidance_scale=ref["scale"], x_T=ref["x_T"], eta=ref["eta"] if name == "ddim" else None,
            verbose=False, img_callback=lambda x0, i: pred_x0.append(x0))
        decoded = txt_model.decode_first_stage(out)
    assert len(model.calls) == len(rec["trace"]) == {"ddim": 10, "plms": 11}[name]
    for (x, t, _), call in zip(model.calls, rec["trace"]):
        assert torch.equal(t, call["t"]) and rel_err(x, call["x"]) < 1e-4
    for mine, step in zip(pred_x0, rec["steps"]):
        assert rel_err(mine, step["pred_x0"]) < 1e-4
    assert rel_err(out, rec["samples"]) < 1e-4
    assert rel_err(decoded, rec["decoded"]) < 1e-4
    ours = (255.0 * torch.clamp((decoded + 1) / 2, 0, 1)).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    assert np.abs(ours.astype(int) - rec["uint8"].numpy()).max() <= 1


# -- the unconditional lsun_churches model ---------------------------------------------------------------
def test_uncond_unet_uses_ema_weights_and_reads_scale_factor(unc, unc_model):
    ref = unc["unet"]
    assert float(unc_model.scale_factor) == unc["sample"]["scale_factor"] == 0.75  # the buffer, not the config
    with torch.no_grad():
        assert rel_err(unc_model.apply_model(ref["x"], ref["t"], None), ref["eps_non_ema"]) < 1e-5
        with unc_model.ema_scope():
            assert rel_err(unc_model.apply_model(ref["x"], ref["t"], None), ref["eps"]) < 1e-5


class Replay(torch.nn.Module):
    """The model's schedule; ``apply_model`` records its inputs and returns the reference's eps of call k."""

    def __init__(self, model, trace):
        super().__init__()
        self.register_buffer("alphas_cumprod", model.alphas_cumprod.clone())
        self.num_timesteps, self.parameterization, self.trace, self.calls = 1000, "eps", trace, []

    def apply_model(self, x, t, cond):
        self.calls.append((x.clone(), t.clone()))
        return self.trace[len(self.calls) - 1]["eps"].clone()


def _uncond_run(model, ref):
    """The reference's sample_diffusion batch: DDIM S=50, eta 1, x_T and every step's noise from
    ``torch.manual_seed(502)`` (a CPU generator seeded alike draws the same numbers)."""
    from ldm.models.diffusion.ddim import DDIMSampler

    pred_x0 = []
    with torch.no_grad():
        out, _ = DDIMSampler(model).sample(ref["S"], ref["shape"][0], ref["shape"][1:], eta=ref["eta"], verbose=False,
                                           generator=torch.Generator().manual_seed(ref["sample_seed"]),
                                           img_callback=lambda x0, i: pred_x0.append(x0))
    return out, pred_x0


def test_uncond_50_step_eta_1_run_matches_reference_draw_for_draw(unc, unc_model):
    from ldm.models.diffusion.ddim import DDIMSampler

    ref = unc["sample"]
    g = torch.Generator().manual_seed(ref["sample_seed"])
    assert torch.equal(torch.randn(ref["x_T"].shape, generator=g), ref["x_T"])
    assert all(torch.equal(torch.randn(n.shape, generator=g), n) for n in ref["noise"])
    sampler = DDIMSampler(unc_model)
    sampler.make_schedule(ref["S"], ddim_eta=ref["eta"], verbose=False)
    for key, value in ref["schedule"].items():
        assert torch.allclose(torch.as_tensor(getattr(sampler, key)).to(value.dtype), value, rtol=1e-6), key
    # the sampler on the recorded eps: every model input, pred_x0 and the result
    replay = Replay(unc_model, ref["trace"])
    out, pred_x0 = _uncond_run(replay, ref)
    assert len(replay.calls) == len(ref["trace"]) == 50
    for (x, t), call in zip(replay.calls, ref["trace"]):
        assert torch.equal(t, call["t"]) and rel_err(x, call["x"]) < 1e-4
    for mine, step in zip(pred_x0, ref["steps"]):
        assert rel_err(mine, step["pred_x0"]) < 1e-4
    assert rel_err(out, ref["samples"]) < 1e-4
    # the real UNet (EMA weights) on recorded calls; the decode of the recorded samples
    with torch.no_grad(), unc_model.ema_scope():
        for call in (ref["trace"][k] for k in (0, 24, 49)):
            assert rel_err(unc_model.apply_model(call["x"], call["t"], None), call["eps"]) < 1e-5
    with torch.no_grad():
        decoded = unc_model.decode_first_stage(ref["samples"])
    assert rel_err(decoded, ref["decoded"]) < 1e-5
    from ldm.image_io import tensor_to_uint8

    assert np.abs(tensor_to_uint8(decoded).astype(int) - ref["png_uint8"].numpy()).max() <= 1
    assert torch.equal(ref["png_uint8"], ref["npz_uint8"])  # the .npz holds the PNGs' bytes


@pytest.mark.slow
def test_uncond_50_step_eta_1_real_model_run(unc, unc_model):
    ref = unc["sample"]
    with unc_model.ema_scope():
        out, _ = _uncond_run(unc_model, ref)
    assert rel_err(out, ref["samples"]) < 1e-4


def test_vanilla_sampling_is_the_ddpm_posterior_over_every_step(unc_model):
    """``-v``: DDIM with eta 1 over all 1000 timesteps equals the reference's p_sample_loop
    (posterior mean + sqrt(posterior variance)·noise, no noise at t = 0), same draws."""
    from ldm.models.diffusion.vanilla import VanillaDDPMSampler

    class Toy(torch.nn.Module):  # a fixed, smooth eps model on the real schedule
        def __init__(self):
            super().__init__()
            self.register_buffer("alphas_cumprod", unc_model.alphas_cumprod.clone())
            self.num_timesteps, self.parameterization = 1000, "eps"

        def apply_model(self, x, t, cond):
            return torch.tanh(x) * (t.view(-1, 1, 1, 1).float() / 1000)

    toy, shape = Toy(), (2, 1, 4, 4)
    out, _ = VanillaDDPMSampler(toy).sample(1, 2, shape[1:], generator=torch.Generator().manual_seed(3),
                                            verbose=False)
    g = torch.Generator().manual_seed(3)
    ac = toy.alphas_cumprod.double()
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    betas = 1 - ac / ac_prev
    x = torch.randn(shape, generator=g).double()
    for t in range(999, -1, -1):
        eps = toy.apply_model(x.float(), torch.full((2,), t), None).double()
        x0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
        mean = (ac_prev[t].sqrt() * betas[t] * x0 + (1 - betas[t]).sqrt() * (1 - ac_prev[t]) * x) / (1 - ac[t])
        var = betas[t] * (1 - ac_prev[t]) / (1 - ac[t])
        x = mean + (var.sqrt() * torch.randn(shape, generator=g).double() if t > 0 else 0)
    assert rel_err(out, x) < 1e-4


# -- full-size layouts -------------------------------------------------------------------------------------
LAYOUTS = [("ldm-txt2img-1p4b.tsv", "configs/latent-diffusion/txt2img-1p4B-eval.yaml"),
           ("ldm-text2img256.tsv", "models/ldm/text2img256/config.yaml"),
           ("ldm-lsun_churches-ldm-kl-8.tsv", "configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml"),
           ("ldm-lsun_churches-ldm-kl-8.tsv", "models/ldm/lsun_churches256/config.yaml")]


@pytest.mark.parametrize("manifest,config", LAYOUTS, ids=[c for _, c in LAYOUTS])
def test_config_builds_official_layout(spec_dir, manifest, config):
    from ldm.checkpoint import instantiate_on_meta

    cfg = OmegaConf.load(REPO / config)
    cfg.model.params.first_stage_config.params.pop("ckpt_path", None)  # as the manifests were made
    model = instantiate_on_meta(cfg.model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == read_manifest(spec_dir / manifest)


# -- families ----------------------------------------------------------------------------------------------
def test_families_from_config_model_and_checkpoint(txt_model, unc_model):
    from ldm.checkpoint import read_checkpoint
    from ldm.families import facts_from_config, facts_from_model, facts_from_state_dict, family_of

    for config, model, ckpt, name in ((TXT_CONFIG, txt_model, TXT_CKPT, "ldm-txt2img"),
                                      (UNC_CONFIG, unc_model, UNC_CKPT, "ldm-uncond")):
        shapes = {k: tuple(v.shape) for k, v in read_checkpoint(ckpt).state_dict.items()}
        found = {family_of(facts_from_config(OmegaConf.load(config))).name, family_of(facts_from_model(model)).name,
                 family_of(facts_from_state_dict(shapes)).name}
        assert found == {name}
    uncond = family_of(facts_from_model(unc_model))
    assert uncond.methods == ("sample_diffusion",) and not uncond.safety_checker


def test_sample_diffusion_method_gives_each_seed_its_own_image(unc_model):
    from ldm.generate import StableDiffusion

    sd = StableDiffusion(unc_model, progress=False)
    both = sd.sample_diffusion([5, 6], steps=2, eta=1.0)
    alone = sd.sample_diffusion(6, steps=2, eta=1.0)
    assert both.images[0].size == (128, 128)  # UNet image_size 16, f = 8
    assert np.array_equal(np.asarray(both.images[1]), np.asarray(alone.images[0]))
    assert not np.array_equal(np.asarray(both.images[0]), np.asarray(both.images[1]))
    assert [r.seed for r in both.records] == [5, 6] and both.records[0].eta == 1.0
    with pytest.raises(UserInputError, match="txt2img"):
        sd.txt2img("a church")


# -- scripts -----------------------------------------------------------------------------------------------
SD_FLAGS = ["--resume", "--n_samples", "--eta", "--vanilla_sample", "--logdir", "--custom_steps", "--batch_size",
            "--seed", "--config", "--device", "--precision", "--fast_batch"]


def test_sample_diffusion_help_lists_every_flag(tmp_path):
    proc = run_script("sample_diffusion.py", "--help", cwd=tmp_path)
    assert_ok(proc)
    entries = help_entries(proc.stdout)
    by_long = {next(w.rstrip(",") for w in e.split() if w.startswith("--")): (short, e) for short, e in entries.items()}
    for flag in SD_FLAGS:
        assert flag in by_long and "default" in by_long[flag][1], flag
    for short, long in (("-r", "--resume"), ("-n", "--n_samples"), ("-e", "--eta"), ("-v", "--vanilla_sample"),
                        ("-l", "--logdir"), ("-c", "--custom_steps")):
        assert by_long[long][0] == short
    assert "KEY=VALUE" in proc.stdout and "(default: 1.0)" in by_long["--eta"][1]


def test_sample_diffusion_end_to_end(tmp_path):
    run_dir = tmp_path / "model"
    run_dir.mkdir()
    (run_dir / "model.ckpt").symlink_to(UNC_CKPT)
    (run_dir / "config.yaml").write_text(UNC_CONFIG.read_text())
    proc = run_script("sample_diffusion.py", "-r", run_dir, "-l", tmp_path / "logs", "-n", "3", "--batch_size", "2",
                      "-c", "4", "--device", "cpu", "--seed", "7", "model.params.log_every_t=100", cwd=tmp_path)
    assert_ok(proc)
    (out,) = (tmp_path / "logs" / "model" / "samples" / "00000000").iterdir()  # global_step 0, one time stamp
    pngs = sorted((out / "img").iterdir())
    assert [p.name for p in pngs] == ["sample_000000.png", "sample_000001.png", "sample_000002.png"]
    arr = np.load(out / "numpy" / "3x128x128x3-samples.npz")["arr_0"]
    assert arr.dtype == np.uint8
    for k, png in enumerate(pngs):
        with Image.open(png) as im:
            assert np.array_equal(np.asarray(im), arr[k])  # too small for the watermark: the same bytes
        meta = params(png)
        assert (meta["Seed"], meta["Steps"], meta["Sampler"], meta["Eta"], meta["Size"]) == \
            (str(7 + k), "4", "DDIM", "1.0", "128x128")
    settings = OmegaConf.load(out / "sampling_config.yaml")
    assert settings.n_samples == 3 and settings.custom_steps == 4 and settings.overrides == ["model.params.log_every_t=100"]
    assert "seed 9" in proc.stderr


@pytest.mark.parametrize("args,fragments", [
    (["-r", "{d}/nothere.ckpt"], ["nothere.ckpt", "not found"]),
    (["-r", "{d}"], ["no model.ckpt"]),
    (["-r", str(UNC_CKPT)], ["no config.yaml", "--config"]),
    (["-r", str(UNC_CKPT), "--config", str(TXT_CONFIG)], ["not an unconditional model", "txt2img.py"]),
    (["-r", str(UNC_CKPT), "--config", str(UNC_CONFIG), "-n", "0"], ["--n_samples must be at least 1"]),
    (["-r", str(UNC_CKPT), "--config", str(UNC_CONFIG), "-c", "3"], ["3 steps"]),
    (["-r", str(UNC_CKPT), "--config", str(UNC_CONFIG), "-e", "-1"], ["negative"]),
    (["-r", str(UNC_CKPT), "--config", str(UNC_CONFIG), "oops"], ["'oops'", "KEY=VALUE"]),
])
def test_sample_diffusion_bad_input_is_one_line(tmp_path, capsys, args, fragments):
    code = load_main("sample_diffusion.py")([a.format(d=tmp_path) for a in args])
    assert_one_line_error(code, capsys.readouterr().err, *fragments)


def test_txt2img_runs_an_ldm_bert_config_with_its_defaults(tmp_path):
    out = tmp_path / "out"
    proc = run_script("txt2img.py", "--config", TXT_CONFIG, "--ckpt", TXT_CKPT, "--bert_vocab", VOCAB, "--prompt",
                      "an astronaut riding a horse", "--H", "64", "--W", "64", "--n_samples", "1", "--n_iter", "1",
                      "--ddim_steps", "2", "--device", "cpu", "--no_safety_check", "--outdir", out, cwd=tmp_path)
    assert_ok(proc)
    meta = params(out / "samples" / "00000.png")
    assert meta["CFG scale"] == "5.0" and meta["Model"] == "ldm-txt2img-tiny-random"
    entries = help_entries(run_script("txt2img.py", "--help", cwd=tmp_path).stdout)
    assert "--bert_vocab" in entries and "vocab.txt" in entries["--bert_vocab"]


def test_txt2img_bert_errors_are_one_line(tmp_path, capsys):
    main = load_main("txt2img.py")
    code = main(["--config", str(TXT_CONFIG), "--ckpt", str(TXT_CKPT), "--no_safety_check", "--outdir",
                 str(tmp_path), "--bert_vocab", str(tmp_path / "none.txt")])
    assert_one_line_error(code, capsys.readouterr().err, "none.txt", "models/ldm/text2img-large/vocab.txt",
                          "--bert_vocab")
    code = main(["--laion400m", "--outdir", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "txt2img-1p4B-eval.yaml",
                          "models/ldm/text2img-large/model.ckpt")


def test_sample_diffusion_never_reuses_a_run_folder(tmp_path):
    import runpy

    new_run_folder = runpy.run_path(str(REPO / "scripts" / "sample_diffusion.py"), run_name="x")["new_run_folder"]
    (tmp_path / "2026-01-02-03-04-05" / "img").mkdir(parents=True)  # an earlier run of that second
    first = new_run_folder(tmp_path, "2026-01-02-03-04-05")
    second = new_run_folder(tmp_path, "2026-01-02-03-04-05")
    assert (first.name, second.name) == ("2026-01-02-03-04-05-1", "2026-01-02-03-04-05-2")
    assert list(first.iterdir()) == [] and (tmp_path / "2026-01-02-03-04-05" / "img").is_dir()
