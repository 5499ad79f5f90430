"""Model families: everything the toolkit knows about each kind of model, in one table.

A *family* is a kind of released model (SD v1, the SD v1 inpainting model, ...) with what the
scripts, the pipeline (:mod:`ldm.generate`) and the CLI (:mod:`ldm.cli`) need to know about it:
how a config or a built model is recognised, the default image size, sampler, step count and
guidance scale, what the model is conditioned on, the invisible-watermark text, whether its images
go through the safety checker, and which pipeline methods (and so which scripts) can run it.
Nothing else in the package re-derives these facts; it asks :func:`family_of`.

Adding a family (see docs/architecture.md, "Adding a model family"): write a recogniser over
:class:`ModelFacts`, add one :class:`Family` to :data:`FAMILIES` *before* any broader family it
would otherwise fall into, and give the pipeline the conditioning it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from ldm.util import config_get

__all__ = ["ModelFacts", "Family", "FAMILIES", "METHODS", "family_of", "get_family", "facts_from_config",
           "facts_from_model", "facts_from_state_dict", "configure_model"]

#: Pipeline method -> (what it is called in messages, the script that runs it).
METHODS = {
    "txt2img": ("txt2img", "scripts/txt2img.py"),
    "img2img": ("img2img", "scripts/img2img.py"),
    "inpaint": ("text-guided inpainting", "scripts/inpaint.py --init-img --mask --prompt"),
    "inpaint_ldm": ("LDM inpainting (--indir)", "scripts/inpaint.py --indir"),
    "upscale": ("x4 upscaling", "scripts/upscale.py"),
    "variations": ("image variations", "scripts/variations.py"),
    "depth2img": ("depth-conditioned img2img", "scripts/depth2img.py"),
    "sample_diffusion": ("unconditional sampling", "scripts/sample_diffusion.py"),
    "sample_class": ("class-conditional sampling", "scripts/sample_class.py"),
    "superres": ("LDM 4x super-resolution", "scripts/superres.py"),
}


@dataclass(frozen=True)
class ModelFacts:
    """What a family is recognised by; read from a config (:func:`facts_from_config`) or from a
    built model (:func:`facts_from_model`), so both give the same family.

    :ivar target: the diffusion model's class path (``ldm.models.diffusion.ddpm.LatentDiffusion``).
    :ivar cond_stage: the conditioning encoder's class path, ``"__is_first_stage__"`` when the model
        is conditioned on its own first stage, ``""`` for none.
    :ivar conditioning_key: ``crossattn``, ``concat``, ``hybrid``, ... (None when unset).
    :ivar latent_channels: channels of the first stage's latents.
    :ivar unet_in_channels: channels the UNet takes (latents plus any concatenated conditioning).
    :ivar parameterization: ``"eps"`` or ``"v"``.
    :ivar conditioner_keys: an sgm ``GeneralConditioner``'s input keys (``txt``,
        ``original_size_as_tuple``, ..., ``aesthetic_score``); empty for ldm models.
    """

    target: str
    cond_stage: str
    conditioning_key: Optional[str]
    latent_channels: int
    unet_in_channels: int
    parameterization: str = "eps"
    conditioner_keys: tuple = ()


@dataclass(frozen=True)
class Family:
    """One model family.

    :ivar name: short id (``"sd-v1"``), used in messages and docs.
    :ivar title: human name (``"Stable Diffusion v1"``).
    :ivar kind: how the pipeline conditions the model: ``"txt2img"`` (text through cross-attention),
        ``"sd-inpaint"`` (text + mask + masked-image latent, 9-channel UNet), ``"ldm-inpaint"``
        (mask + masked image through the first stage, no text), ``"upscale"`` (text + a noise-augmented
        low-resolution image and its noise level, the SD 2 x4 upscaler), ``"unclip"`` (text + a
        noise-augmented CLIP image embedding, Stable unCLIP), ``"depth"`` (text + a depth map
        concatenated to the latent of a noised init image, SD 2 depth2img), ``"uncond"`` (no conditioning,
        the unconditional LDMs), ``"class"`` (an ImageNet class through a ``ClassEmbedder``),
        ``"superres"`` (a low-resolution image concatenated to the latent, LDM bsr_sr) or ``"other"``.
    :ivar recognise: ``recognise(facts) -> bool``.
    :ivar conditioning: what the model is conditioned on, e.g. ``("text",)``.
    :ivar methods: pipeline methods that can run it (keys of :data:`METHODS`); scripts follow.
    :ivar size: default ``(height, width)`` in pixels (a config's ``demo:`` section may override).
    :ivar sampler, steps: defaults of every script and method.
    :ivar scale: default guidance scale per method (the reference scripts' defaults).
    :ivar strength: default img2img strength.
    :ivar watermark: text of the invisible watermark written into its images.
    :ivar safety_checker: whether its images go through the safety checker by default.
    :ivar upcast_attention: the reference computes attention scores and softmax in float32 also
        in half precision (SD 2); see :func:`configure_model`.
    :ivar config, checkpoint: where the original scripts expected its config and checkpoint.
    :ivar unsupported: why it cannot run yet (None when it can).
    """

    name: str
    title: str
    kind: str
    recognise: Callable[[ModelFacts], bool]
    conditioning: tuple = ()
    methods: tuple = ()
    size: tuple = (512, 512)
    sampler: str = "ddim"
    steps: int = 50
    scale: Mapping[str, float] = field(default_factory=lambda: {"txt2img": 7.5, "img2img": 5.0, "inpaint": 7.5,
                                                                "inpaint_ldm": 1.0})
    strength: float = 0.75
    watermark: str = "StableDiffusionV1"
    safety_checker: bool = True
    upcast_attention: bool = False
    config: Optional[str] = None
    checkpoint: Optional[str] = None
    unsupported: Optional[str] = None

    def default_scale(self, method: str) -> float:
        """The guidance scale ``method`` uses when none is given."""
        return float(self.scale.get(method, 7.5))

    def usage_hint(self) -> str:
        """What this model is and which script runs it, for an error message."""
        if self.unsupported:
            return self.unsupported
        if not self.methods:
            return f"it is {self.title}, which no script here runs"
        scripts = " or ".join(dict.fromkeys(METHODS[m][1] for m in self.methods))
        return f"it is {self.title}: use {scripts}"


def _is_sd_inpainting(f: ModelFacts) -> bool:
    return f.target.endswith("LatentInpaintDiffusion") or (
        f.conditioning_key == "hybrid" and f.unet_in_channels == 2 * f.latent_channels + 1)


def _is_x4_upscaler(f: ModelFacts) -> bool:
    return f.target.endswith("LatentUpscaleDiffusion") or f.conditioning_key == "hybrid-adm"


def _is_depth2img(f: ModelFacts) -> bool:
    return f.target.endswith("LatentDepth2ImageDiffusion") or (
        f.conditioning_key == "hybrid" and f.unet_in_channels == f.latent_channels + 1)


def _is_unclip(f: ModelFacts) -> bool:
    return f.target.endswith("ImageEmbeddingConditionedLatentDiffusion") or f.conditioning_key == "crossattn-adm"


def _is_text_to_image(f: ModelFacts) -> bool:
    return bool(f.cond_stage) and f.unet_in_channels == f.latent_channels


def _is_unconditional(f: ModelFacts) -> bool:
    return f.cond_stage in ("", "__is_unconditional__") and f.unet_in_channels == f.latent_channels


def _is_class_conditional(f: ModelFacts) -> bool:
    return f.cond_stage.endswith("ClassEmbedder")


def _is_ldm_superres(f: ModelFacts) -> bool:
    """bsr_sr: the low-resolution RGB image concatenated to the latent, no encoder (``nn.Identity``)."""
    return (f.unet_in_channels == f.latent_channels + 3 and f.conditioning_key in (None, "concat")
            and (f.cond_stage == "" or f.cond_stage.endswith("Identity")))


def _is_sdxl(f: ModelFacts, key: str) -> bool:
    """An sgm ``DiffusionEngine`` whose conditioner reads ``key`` (``target_size_as_tuple``: the
    base; ``aesthetic_score``: the refiner)."""
    return f.target.endswith("DiffusionEngine") and key in f.conditioner_keys


def _is_open_clip(f: ModelFacts) -> bool:
    return f.cond_stage.endswith("FrozenOpenCLIPEmbedder")


#: The SD 2 scripts' defaults: guidance 9 everywhere, img2img strength 0.8, the "SDV2" watermark.
_SD2 = dict(scale={"txt2img": 9.0, "img2img": 9.0, "inpaint": 9.0}, strength=0.8, watermark="SDV2",
            upcast_attention=True)


#: Every family, most specific first: :func:`family_of` returns the first that recognises a model.
FAMILIES: tuple = (
    Family("sdxl-base", "SDXL 1.0 base", "sdxl", lambda f: _is_sdxl(f, "target_size_as_tuple"),
           conditioning=("text (CLIP-L + OpenCLIP bigG)", "original size", "crop", "target size"),
           methods=("txt2img", "img2img"), size=(1024, 1024), sampler="dpmpp_2m", steps=50,
           scale={"txt2img": 6.0, "img2img": 6.0}, watermark="0xB3EC907BB19E",
           config="configs/inference/sd_xl_base.yaml", checkpoint="checkpoints/sd_xl_base_1.0.safetensors"),
    Family("sdxl-refiner", "SDXL 1.0 refiner", "sdxl", lambda f: _is_sdxl(f, "aesthetic_score"),
           conditioning=("text (OpenCLIP bigG)", "original size", "crop", "aesthetic score"),
           methods=("txt2img", "img2img"), size=(1024, 1024), sampler="dpmpp_2m", steps=50,
           scale={"txt2img": 6.0, "img2img": 6.0}, strength=0.15, watermark="0xB3EC907BB19E",
           config="configs/inference/sd_xl_refiner.yaml", checkpoint="checkpoints/sd_xl_refiner_1.0.safetensors"),
    Family("sd-x4-upscaler", "the SD 2 x4 upscaler", "upscale", _is_x4_upscaler,
           conditioning=("text", "noise-augmented low-resolution image", "noise level"), methods=("upscale",),
           config="configs/stable-diffusion/x4-upscaling.yaml", checkpoint="x4-upscaler-ema.ckpt",
           **{**_SD2, "scale": {"upscale": 9.0}}),
    Family("sd-v2-depth", "the SD 2 depth-conditioned model (depth2img)", "depth", _is_depth2img,
           conditioning=("text", "depth map (MiDaS or given)", "init image"), methods=("depth2img",),
           config="configs/stable-diffusion/v2-midas-inference.yaml", checkpoint="512-depth-ema.ckpt",
           **{**_SD2, "scale": {"depth2img": 9.0}, "strength": 0.9}),
    Family("sd-v2-unclip", "a Stable unCLIP 2.1 image-variation model", "unclip", _is_unclip,
           conditioning=("text", "noise-augmented CLIP image embedding", "noise level"), methods=("variations",),
           size=(768, 768), config="configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml",
           checkpoint="sd21-unclip-h.ckpt", **{**_SD2, "scale": {"variations": 10.0}}),
    Family("ldm-inpainting", "the LDM inpainting model (inpainting_big)", "ldm-inpaint",
           lambda f: f.cond_stage == "__is_first_stage__", conditioning=("mask", "masked image"),
           methods=("inpaint_ldm",), size=(256, 256), config="models/ldm/inpainting_big/config.yaml",
           checkpoint="models/ldm/inpainting_big/last.ckpt"),
    Family("sd-v2-inpainting", "an SD 2 inpainting model", "sd-inpaint",
           lambda f: _is_sd_inpainting(f) and _is_open_clip(f), conditioning=("text", "mask", "masked-image latent"),
           methods=("inpaint",), config="configs/stable-diffusion/v2-inpainting-inference.yaml",
           checkpoint="512-inpainting-ema.ckpt", **_SD2),
    Family("sd-v1-inpainting", "an SD inpainting model", "sd-inpaint", _is_sd_inpainting,
           conditioning=("text", "mask", "masked-image latent"), methods=("inpaint",),
           config="configs/stable-diffusion/v1-inpainting-inference.yaml", checkpoint="sd-v1-5-inpainting.ckpt"),
    Family("ldm-txt2img", "an LDM text-to-image model (BERT text encoder)", "txt2img", lambda f: "BERT" in f.cond_stage,
           conditioning=("text",), methods=("txt2img",), size=(256, 256), scale={"txt2img": 5.0},
           config="configs/latent-diffusion/txt2img-1p4B-eval.yaml", checkpoint="models/ldm/text2img-large/model.ckpt"),
    Family("ldm-cin", "a class-conditional ImageNet LDM (cin256-v2, cin256)", "class", _is_class_conditional,
           conditioning=("ImageNet class",), methods=("sample_class",), size=(256, 256), steps=20,
           scale={"sample_class": 3.0}, safety_checker=False,
           config="configs/latent-diffusion/cin256-v2.yaml", checkpoint="models/ldm/cin256-v2/model.ckpt"),
    Family("ldm-superres", "the LDM 4x super-resolution model (bsr_sr)", "superres", _is_ldm_superres,
           conditioning=("low-resolution image",), methods=("superres",), size=(256, 256), steps=100,
           scale={"superres": 1.0}, safety_checker=False,
           config="models/ldm/bsr_sr/config.yaml", checkpoint="models/ldm/bsr_sr/model.ckpt"),
    Family("ldm-uncond", "an unconditional LDM (CelebA-HQ, FFHQ, LSUN)", "uncond", _is_unconditional,
           methods=("sample_diffusion",), size=(256, 256), scale={"sample_diffusion": 1.0}, safety_checker=False,
           config="models/ldm/lsun_churches256/config.yaml", checkpoint="models/ldm/lsun_churches256/model.ckpt"),
    Family("sd-v2-v", "a Stable Diffusion 2 768-v text-to-image model (v-prediction)", "txt2img",
           lambda f: _is_text_to_image(f) and _is_open_clip(f) and f.parameterization == "v", conditioning=("text",),
           methods=("txt2img", "img2img", "inpaint"), size=(768, 768),
           config="configs/stable-diffusion/v2-inference-v.yaml", checkpoint="v2-1_768-ema-pruned.ckpt", **_SD2),
    Family("sd-v2", "a Stable Diffusion 2 512-base text-to-image model", "txt2img",
           lambda f: _is_text_to_image(f) and _is_open_clip(f), conditioning=("text",),
           methods=("txt2img", "img2img", "inpaint"), config="configs/stable-diffusion/v2-inference.yaml",
           checkpoint="v2-1_512-ema-pruned.ckpt", **_SD2),
    Family("sd-v1", "a Stable Diffusion v1 text-to-image model", "txt2img", _is_text_to_image, conditioning=("text",),
           methods=("txt2img", "img2img", "inpaint"), config="configs/stable-diffusion/v1-inference.yaml",
           checkpoint="models/ldm/stable-diffusion-v1/model.ckpt"),
    Family("unknown", "not a text-to-image model", "other", lambda f: True),
)


def family_of(facts: ModelFacts) -> Family:
    """The first family of :data:`FAMILIES` that recognises ``facts`` (``unknown`` at the end)."""
    return next(family for family in FAMILIES if family.recognise(facts))


def get_family(name: str) -> Family:
    """The family called ``name``; :raises KeyError: naming the known ones."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def facts_from_config(config: Mapping[str, Any]) -> ModelFacts:
    """:class:`ModelFacts` of a config (the whole YAML or its ``model`` node); reads only, builds nothing."""
    node = config.get("model", config) if hasattr(config, "get") else config
    params = config_get(node, "params", default={})
    cond_stage = config_get(params, "cond_stage_config", default="")
    latent = int(config_get(params, "first_stage_config", "params", "embed_dim",
                            default=config_get(params, "channels", default=4)))
    sgm_unet_in = config_get(params, "network_config", "params", "in_channels", default=latent)  # sgm's name
    sgm_keys = tuple(str(e.get("input_key")) for e in config_get(params, "conditioner_config", "params", "emb_models",
                                                                 default=[]))
    return ModelFacts(
        target=str(config_get(node, "target", default="")),
        cond_stage=str(config_get(cond_stage, "target", default="")) if hasattr(cond_stage, "get") else str(cond_stage),
        conditioning_key=config_get(params, "conditioning_key"),
        latent_channels=latent,
        unet_in_channels=int(config_get(params, "unet_config", "params", "in_channels", default=sgm_unet_in)),
        parameterization=str(config_get(params, "parameterization", default="eps")), conditioner_keys=sgm_keys)


def facts_from_model(model) -> ModelFacts:
    """:class:`ModelFacts` of a built diffusion model (``LatentDiffusion`` and its subclasses)."""
    def path(obj) -> str:
        return f"{type(obj).__module__}.{type(obj).__qualname__}"

    cond = getattr(model, "cond_stage_model", None)
    first = getattr(model, "first_stage_model", None)
    if cond is None:
        cond_stage = ""
    else:
        cond_stage = "__is_first_stage__" if cond is first else path(cond)
    latent = int(getattr(first, "embed_dim", getattr(model, "channels", 4)))
    unet = model.model
    embedders = getattr(getattr(model, "conditioner", None), "embedders", ())  # sgm
    return ModelFacts(target=path(model), cond_stage=cond_stage,
                      conditioning_key=getattr(unet, "conditioning_key", None),
                      latent_channels=latent, unet_in_channels=int(unet.diffusion_model.in_channels),
                      parameterization=str(getattr(model, "parameterization", "eps")),
                      conditioner_keys=tuple(str(getattr(e, "input_key", "")) for e in embedders))


#: Key prefixes that tell a checkpoint's conditioning encoder (what ``facts_from_state_dict`` reads).
_COND_STAGE_KEYS = (
    ("cond_stage_model.model.transformer.resblocks.", "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"),
    ("cond_stage_model.transformer.text_model.", "ldm.modules.encoders.modules.FrozenCLIPEmbedder"),
    ("cond_stage_model.transformer.attn_layers.", "ldm.modules.encoders.modules.BERTEmbedder"),
    ("cond_stage_model.encoder.", "__is_first_stage__"),
    ("cond_stage_model.embedding.", "ldm.modules.encoders.modules.ClassEmbedder"),
)


def facts_from_state_dict(shapes: Mapping[str, Any]) -> Optional[ModelFacts]:
    """:class:`ModelFacts` of a checkpoint, from its key names and shapes alone (``{key: shape}``);
    None when it holds no diffusion UNet. What keys cannot tell (v- or eps-prediction: the 512-base
    and 768-v SD 2 files have the same keys) is left at the common choice (eps)."""
    unet = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    post_quant = shapes.get("first_stage_model.post_quant_conv.weight")
    if unet is None or post_quant is None:
        return None
    cond = next((target for prefix, target in _COND_STAGE_KEYS if any(k.startswith(prefix) for k in shapes)), "")
    latent, unet_in = int(post_quant[1]), int(unet[1])
    # + mask + masked image: inpainting; + depth: depth2img; + RGB: x4
    key = "hybrid" if unet_in in (2 * latent + 1, latent + 1) else "hybrid-adm" if unet_in == latent + 3 else None
    if key == "hybrid-adm" and not cond:  # + RGB without a text encoder: the LDM bsr_sr model
        key = "concat"
    if key is None and "model.diffusion_model.label_emb.0.0.weight" in shapes:  # a vector y: unCLIP
        key = "crossattn-adm"
    sgm = next((keys for probe, keys in _SGM_CONDITIONERS if probe in shapes), None)
    if sgm is not None:
        return ModelFacts(target="sgm.models.diffusion.DiffusionEngine", cond_stage="sgm.modules.GeneralConditioner",
                          conditioning_key=None, latent_channels=latent, unet_in_channels=unet_in, conditioner_keys=sgm)
    return ModelFacts(target="", cond_stage=cond, conditioning_key=key, latent_channels=latent,
                      unet_in_channels=unet_in)


#: A key of an sgm file -> its conditioner's input keys (SDXL base: CLIP-L + bigG as embedders 0, 1;
#: the refiner: bigG as embedder 0)
_SGM_CONDITIONERS = (
    ("conditioner.embedders.1.model.ln_final.weight",
     ("txt", "txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")),
    ("conditioner.embedders.0.model.ln_final.weight",
     ("txt", "original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")),
)


def configure_model(model, family: Family) -> None:
    """Give a built model the family's numeric choices that its config cannot carry: attention
    scores in float32 (``upcast_attention``) for the SD 2 families. The pipeline calls this; call it
    when running a model from Python without :class:`ldm.generate.StableDiffusion`."""
    for module in model.modules():
        if hasattr(module, "upcast_attention"):
            module.upcast_attention = family.upcast_attention
