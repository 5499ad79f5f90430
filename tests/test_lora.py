"""LoRA: file layouts (kohya/A1111, diffusers/PEFT), the merge formula, exact unmerge, reports and errors.

Ground truth: A1111's diffusers -> CompVis UNet name conversion (``convert_diffusers_name_to_compvis``,
written out below for SD's 2-res-block layout) on the tiny SD v1 config; ``W + (alpha / r) up @ down``;
a LoCon delta equals running its two convolutions; restored weights equal the originals bit for bit.
"""
from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm.errors import UserInputError
from ldm.metadata import parse_parameters
from ldm.personalize.files import file_sha256
from ldm.personalize.lora import LoraLayer, LoraManager, load_lora, save_lora
from ldm.personalize.lora_keys import layer_names
from tests.helpers import DEMO_CONFIG, DEMO_WEIGHTS, TINY_CONFIG, load_config

# demo UNet (channel_mult [1, 2], one res block per level, attention at both levels) in diffusers names
DEMO_LAYERS = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q":
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_up_blocks_0_resnets_1_conv1": "model.diffusion_model.output_blocks.1.0.in_layers.2.weight",
    "lora_unet_up_blocks_1_attentions_0_proj_in": "model.diffusion_model.output_blocks.2.1.proj_in.weight",
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj":
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight",
}

# the same layers as diffusers/PEFT name them
PEFT_NAMES = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q":
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_up_blocks_0_resnets_1_conv1": "unet.up_blocks.0.resnets.1.conv1",
    "lora_unet_up_blocks_1_attentions_0_proj_in": "base_model.model.unet.up_blocks.1.attentions.0.proj_in",
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj": "text_encoder.text_model.encoder.layers.1.self_attn.v_proj",
}


def _a1111_compvis_name(key: str) -> str | None:
    """A1111's ``convert_diffusers_name_to_compvis`` for the UNet (SD layout: 2 res blocks, 3 per level)."""
    res = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = res.get(rest, rest) if kind == "resnets" else rest
        return f"input_blocks_{1 + b * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = res.get(rest, rest) if kind == "resnets" else rest
        return f"middle_block_{1 if kind == 'attentions' else j * 2}_{rest}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = res.get(rest, rest) if kind == "resnets" else rest
        return f"output_blocks_{b * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        b = int(m[1])
        return f"output_blocks_{2 + b * 3}_{2 if b > 0 else 1}_conv"
    return None


def test_unet_names_follow_a1111_conversion_on_the_sd_layout():
    from ldm.checkpoint import instantiate_on_meta

    model = instantiate_on_meta(load_config(TINY_CONFIG).model)
    checked = 0
    for key, target in layer_names(model).items():
        if not key.startswith("lora_unet_"):
            continue
        expected = _a1111_compvis_name(key)
        if expected is None:
            continue
        assert target.path.replace(".", "_") == f"model_diffusion_model_{expected}_weight", key
        checked += 1
    assert checked > 100


@pytest.fixture(scope="module")
def demo():
    from ldm.generate import StableDiffusion

    return StableDiffusion.from_files(DEMO_CONFIG, DEMO_WEIGHTS, device="cpu", precision="fp32", progress=False,
                                      hash_checkpoint=False)


def _kohya_file(sd, path, rank=4, alpha=2.0, seed=0, layers=DEMO_LAYERS, extra=None):
    g = torch.Generator().manual_seed(seed)
    params = dict(sd.model.named_parameters())
    tensors = {}
    for key, param_name in layers.items():
        w = params[param_name]
        inner = w.shape[1:]
        down_shape = (rank, *inner) if w.dim() == 4 and w.shape[-1] == 3 else (rank, *inner)
        up_shape = (w.shape[0], rank, 1, 1) if w.dim() == 4 else (w.shape[0], rank)
        tensors[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return tensors


def test_merge_formula_locon_and_exact_restore(demo, tmp_path):
    tensors = _kohya_file(demo, tmp_path / "style.safetensors")
    before = {k: v.detach().clone() for k, v in demo.model.state_dict().items()}
    manager = demo.text.manager
    lora = manager.load(tmp_path / "style.safetensors")
    assert not lora.unmatched and lora.hash == file_sha256(tmp_path / "style.safetensors", True)[:12]
    manager.apply([(lora, 0.8)])
    params = dict(demo.model.named_parameters())
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    w0 = before[DEMO_LAYERS[key]]
    up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
    torch.testing.assert_close(params[DEMO_LAYERS[key]], w0 + 0.8 * (2.0 / 4) * up @ down, rtol=0, atol=1e-6)
    # LoCon: the merged 3x3 conv equals the original plus its down (3x3) then up (1x1) convolutions
    key = "lora_unet_up_blocks_0_resnets_1_conv1"
    conv = demo.model.model.diffusion_model.output_blocks[1][0].in_layers[2]
    x = torch.randn(1, conv.in_channels, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lowrank = F.conv2d(F.conv2d(x, tensors[f"{key}.lora_down.weight"], padding=1), tensors[f"{key}.lora_up.weight"])
        expected = F.conv2d(x, before[DEMO_LAYERS[key]], conv.bias, padding=1) + 0.8 * 0.5 * lowrank
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    manager.apply([])
    after = demo.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_weight_zero_is_bit_identical_and_a_tag_changes_the_image(demo, tmp_path):
    _kohya_file(demo, tmp_path / "style.safetensors")
    base = demo.txt2img("a red circle", 5, steps=6).images[0].tobytes()
    demo.text.configure(loras=[f"{tmp_path / 'style.safetensors'}:0"], lora_dir=tmp_path)
    try:
        assert demo.txt2img("a red circle", 5, steps=6).images[0].tobytes() == base
        r = demo.txt2img("a red circle <lora:style:1.5>", 5, steps=6)
        assert r.images[0].tobytes() != base
        meta = parse_parameters(r.records[0].parameters())
        assert meta["Prompt"] == "a red circle <lora:style:1.5>"
        assert meta["Lora hashes"] == "style: " + file_sha256(tmp_path / "style.safetensors", True)[:12]
        assert demo.txt2img("a red circle", 5, steps=6).images[0].tobytes() == base  # switched back exactly
    finally:
        demo.text.configure(loras=[])
        demo.text.manager.apply([])


def test_peft_layout_merges_as_kohya(demo, tmp_path):
    tensors = _kohya_file(demo, tmp_path / "k.safetensors", alpha=4.0)  # alpha = rank: scale 1, as PEFT without alpha
    peft = {}
    for key, dotted in PEFT_NAMES.items():
        peft[f"{dotted}.lora_A.weight"] = tensors[f"{key}.lora_down.weight"]
        peft[f"{dotted}.lora_B.weight"] = tensors[f"{key}.lora_up.weight"]
    save_file(peft, str(tmp_path / "p.safetensors"))
    manager = LoraManager(demo.model)
    a = manager.check(load_lora(tmp_path / "k.safetensors"))
    b = manager.check(load_lora(tmp_path / "p.safetensors"))
    assert not b.unmatched, b.unmatched
    manager.apply([(a, 1.0)])
    merged_a = {k: v.clone() for k, v in demo.model.state_dict().items()}
    manager.apply([(b, 1.0)])
    merged_b = {k: v.clone() for k, v in demo.model.state_dict().items()}
    manager.apply([])
    assert all(torch.equal(merged_a[k], merged_b[k]) for k in merged_a)
    changed = [k for k, v in demo.model.state_dict().items() if not torch.equal(v, merged_a[k])]
    assert sorted(changed) == sorted(DEMO_LAYERS.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_switching_does_not_drift(tmp_path, dtype):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config

    model = load_model_from_config(OmegaConf.load(DEMO_CONFIG), DEMO_WEIGHTS, device="cpu", dtype=dtype)
    sd = SimpleNamespace(model=model)
    _kohya_file(sd, tmp_path / "a.safetensors", seed=1)
    _kohya_file(sd, tmp_path / "b.safetensors", seed=2)
    before = {k: v.clone() for k, v in sd.model.state_dict().items()}
    m = LoraManager(model)
    a, b = m.load(tmp_path / "a.safetensors"), m.load(tmp_path / "b.safetensors")
    for _ in range(5):
        m.apply([(a, 0.7)])
        m.apply([(a, 0.7), (b, 0.3)])
        m.apply([(b, 1.0)])
        merged = model.model.diffusion_model.input_blocks[3][1].transformer_blocks[0].attn2.to_k.weight
        assert merged.dtype == dtype and not torch.equal(merged, before[DEMO_LAYERS[next(iter(DEMO_LAYERS))]])
    m.apply([])
    assert all(torch.equal(sd.model.state_dict()[k], v) for k, v in before.items())


def test_unmatched_keys_are_reported(demo, tmp_path, caplog):
    extra = {"lora_unet_nonexistent_layer.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_nonexistent_layer.lora_up.weight": torch.zeros(8, 4),
             "lora_unet_x.hada_w1_a": torch.zeros(2, 2)}
    _kohya_file(demo, tmp_path / "partial.safetensors", extra=extra)
    with caplog.at_level(logging.WARNING):
        lora = LoraManager(demo.model).check(load_lora(tmp_path / "partial.safetensors"))
    assert lora.unmatched == ["lora_unet_nonexistent_layer", "lora_unet_x.hada_w1_a"]
    assert "lora_unet_nonexistent_layer" in caplog.text and "not applied" in caplog.text


def test_lora_for_another_model_is_one_error_line(demo, tmp_path):
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
               "lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q.lora_up.weight": torch.zeros(640, 4)},
              str(tmp_path / "xl.safetensors"))
    with pytest.raises(UserInputError, match="does not fit this model: none of its 2 layers.*made for SDXL") as err:
        LoraManager(demo.model).check(load_lora(tmp_path / "xl.safetensors"))
    assert "\n" not in str(err.value)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(64, 4)},
              str(tmp_path / "v1.safetensors"))
    with pytest.raises(UserInputError, match=r"other shapes, e\.g\. .*attn2_to_k \(64x768 vs 128x32\).*SD v1"):
        LoraManager(demo.model).check(load_lora(tmp_path / "v1.safetensors"))
    with pytest.raises(UserInputError, match="no LoRA named 'missing'"):
        demo.txt2img("a circle <lora:missing:1>", 1, steps=2)


def test_sd2_text_encoder_lora_lands_on_the_stacked_in_proj_rows(spec_dir, tmp_path):
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config
    from tests.helpers import register_tiny_openclip

    fixtures = spec_dir / "fixtures"
    register_tiny_openclip(fixtures)
    model = load_model_from_config(OmegaConf.load(fixtures / "sd-v2-v-tiny.yaml"),
                                   fixtures / "sd-v2-v-tiny-random.ckpt", device="cpu", dtype=torch.float32)
    attn = model.cond_stage_model.model.transformer.resblocks[0].attn
    width = attn.in_proj_weight.shape[1]
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(width, 2, generator=g), torch.randn(2, width, generator=g)
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": up,
               "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": down,
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4 * width, 2),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, width)},
              str(tmp_path / "sd2.safetensors"))
    before = attn.in_proj_weight.detach().clone()
    manager = LoraManager(model)
    lora = manager.load(tmp_path / "sd2.safetensors")
    assert not lora.unmatched
    manager.apply([(lora, 0.5)])
    expected = before.clone()
    expected[width:2 * width] += 0.5 * up @ down  # k rows only; no alpha: scale 1
    torch.testing.assert_close(attn.in_proj_weight, expected, rtol=0, atol=1e-6)
    manager.restore()
    assert torch.equal(attn.in_proj_weight, before)


def test_an_ema_config_samples_with_the_lora_too(tmp_path):
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config

    cfg = OmegaConf.load(DEMO_CONFIG)
    cfg.model.params.use_ema = True  # ema_scope() copies the shadows into the UNet to sample
    model = load_model_from_config(cfg, DEMO_WEIGHTS, device="cpu", dtype=torch.float32)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    up, down = torch.randn(128, 2), torch.randn(2, 32)
    save_file({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}, str(tmp_path / "l.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manager = LoraManager(model)
    manager.apply([(manager.load(tmp_path / "l.safetensors"), 1.0)])
    weight = model.model.diffusion_model.input_blocks[3][1].transformer_blocks[0].attn2.to_k.weight
    name = "model." + [n for n, p in model.model.named_parameters() if p is weight][0]
    with model.ema_scope():
        shadow = before["model_ema." + model.model_ema.m_name2s_name[name[len("model."):]]]
        torch.testing.assert_close(weight, shadow + up @ down, rtol=0, atol=1e-6)
    manager.apply([])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_kohya_file_round_trip_and_old_diffusers_layouts(tmp_path):
    g = torch.Generator().manual_seed(3)
    layers = {"lora_unet_a": LoraLayer(torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g), 1.0),
              "lora_unet_b": LoraLayer(torch.randn(4, 3, 1, 1, generator=g), torch.randn(3, 5, 3, 3, generator=g))}
    back = load_lora(save_lora(layers, tmp_path / "rt.safetensors"))
    assert back.layers.keys() == layers.keys() and not back.unsupported
    for name, layer in layers.items():
        assert torch.equal(back.layers[name].up, layer.up) and torch.equal(back.layers[name].down, layer.down)
    assert back.layers["lora_unet_a"].scale == 0.5 and back.layers["lora_unet_b"].scale == 1.0
    old = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    save_file({f"{old}.up.weight": torch.zeros(4, 2), f"{old}.down.weight": torch.zeros(2, 4),
               "unet.conv_in.lora_layer.up.weight": torch.zeros(4, 2),
               "unet.conv_in.lora_layer.down.weight": torch.zeros(2, 4)}, str(tmp_path / "old.safetensors"))
    assert sorted(load_lora(tmp_path / "old.safetensors").layers) == [
        "unet.conv_in", "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"]
