"""The CLIP concept check ("NSFW filter") of the original SD v1 scripts, loaded from local files.

It is the published ``StableDiffusionSafetyChecker`` logic: the CLIP ViT-L/14 vision tower and a
768x1024 ``visual_projection`` embed the image; its cosine similarity to 17 fixed concept
embeddings, minus each concept's threshold, is the concept score; an image is flagged when any
concept score is above 0. Three "special care" embeddings, scored first, make the check stricter:
once one of them scores above 0, 0.01 is added to every later score of that image.

Numeric quirks kept from the reference (diffusers' ``forward``, numpy 1.x era):

- every score is ``round(cos - threshold + adjustment, 3)`` in float64 (the cosine itself is
  float32), and the *rounded* value is compared with 0: a concept 0.0004 over its threshold passes;
- the special-care adjustment applies from the special concept that triggered it on, so it also
  raises the scores of the special concepts after it.

Weights are not bundled: put the public ``CompVis/stable-diffusion-safety-checker`` release files
(``config.json``, ``preprocessor_config.json``, ``pytorch_model.bin`` or ``model.safetensors``) in
``models/safety_checker/``. Nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ldm.modules.encoders.clip import CLIPVisionConfig, CLIPVisionModel

log = logging.getLogger(__name__)

DEFAULT_SAFETY_CHECKER_DIR = Path("models/safety_checker")
RELEASE_NAME = "CompVis/stable-diffusion-safety-checker"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# CLIPFeatureExtractor defaults (OpenAI CLIP's normalisation), used when preprocessor_config.json is absent.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224

BASE_ADJUSTMENT = 0.0  # added to every score; the published checker uses 0.0
SPECIAL_CARE_ADJUSTMENT = 0.01  # the adjustment once a special-care concept fires
SCORE_DECIMALS = 3  # scores are rounded before the "> 0" test


@dataclass
class SafetyScores:
    """The check of one image.

    :ivar nsfw: True when any concept score is > 0 (the image should be replaced).
    :ivar concept_scores: per concept, ``round(cos - threshold + adjustment, 3)``.
    :ivar special_scores: the same for the special-care concepts.
    :ivar bad_concepts: indices of concepts with score > 0.
    :ivar special_care: indices of special-care concepts with score > 0.
    """

    nsfw: bool
    concept_scores: list[float]
    special_scores: list[float]
    bad_concepts: list[int]
    special_care: list[int]


def score_concepts(special_cos: np.ndarray, concept_cos: np.ndarray, special_thresholds: np.ndarray,
                   concept_thresholds: np.ndarray) -> list[SafetyScores]:
    """Turn cosine similarities into the reference's decisions.

    :param special_cos: ``[B, S]`` cosine of each image embedding to each special-care concept.
    :param concept_cos: ``[B, C]`` cosine to each concept.
    :param special_thresholds: ``[S]``; :param concept_thresholds: ``[C]``.
    """
    special_cos = np.asarray(special_cos, dtype=np.float64)
    concept_cos = np.asarray(concept_cos, dtype=np.float64)
    special_thresholds = np.asarray(special_thresholds, dtype=np.float64)
    concept_thresholds = np.asarray(concept_thresholds, dtype=np.float64)
    results = []
    for s_cos, c_cos in zip(special_cos, concept_cos):
        adjustment = BASE_ADJUSTMENT
        special_scores, special_care = [], []
        for j, (cos, threshold) in enumerate(zip(s_cos, special_thresholds)):
            score = float(np.round(cos - threshold + adjustment, SCORE_DECIMALS))
            special_scores.append(score)
            if score > 0:
                special_care.append(j)
                adjustment = SPECIAL_CARE_ADJUSTMENT
        concept_scores = [float(np.round(cos - t + adjustment, SCORE_DECIMALS)) for cos, t in zip(c_cos, concept_thresholds)]
        bad = [k for k, score in enumerate(concept_scores) if score > 0]
        results.append(SafetyScores(bool(bad), concept_scores, special_scores, bad, special_care))
    return results


def _as_pil_list(images: Any) -> list[Image.Image]:
    """Accept a PIL image, a list of PIL images, or uint8 arrays ``[H, W, 3]`` / ``[N, H, W, 3]``."""
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 arrays [N, H, W, 3] or [H, W, 3], got {images.dtype} {list(images.shape)}; "
                "convert [0, 1] floats with (255 * x).round().astype(np.uint8) as the reference did"
            )
        return [Image.fromarray(a) for a in (images[None] if images.ndim == 3 else images)]
    if isinstance(images, Sequence) and not isinstance(images, str):
        out = []
        for image in images:
            out.extend(_as_pil_list(image))
        return out
    raise ValueError(f"images must be PIL images or uint8 arrays [N, H, W, 3], got {type(images).__name__}")


class SafetyChecker(nn.Module):
    """CLIP concept checker; attribute names equal the keys of the released weights file.

    :param vision_config: the vision tower (ViT-L/14 in the release).
    :param projection_dim: width of the image embedding and of the concept embeddings (768).
    :param n_concepts: number of concepts (17); :param n_special: special-care concepts (3).
    :param preprocess: CLIPFeatureExtractor settings: ``size``, ``crop_size``, ``image_mean``,
        ``image_std``, ``resample`` (PIL filter number, 3 = bicubic).
    """

    def __init__(self, vision_config: CLIPVisionConfig | None = None, projection_dim: int = 768, n_concepts: int = 17,
                 n_special: int = 3, preprocess: dict | None = None):
        super().__init__()
        vision_config = vision_config or CLIPVisionConfig()
        self.vision_model = CLIPVisionModel(vision_config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, projection_dim, bias=False)
        # Defined values until the released file is loaded (strictly, by load_safety_checker):
        # random concept directions with thresholds of 1, which no cosine exceeds (nothing flagged).
        self.concept_embeds = nn.Parameter(torch.randn(n_concepts, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.randn(n_special, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(n_concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(n_special), requires_grad=False)
        pre = preprocess or {}
        self.size = _int_size(pre.get("size", CLIP_IMAGE_SIZE), "shortest_edge")
        self.crop_size = _int_size(pre.get("crop_size", CLIP_IMAGE_SIZE), "height")
        self.image_mean = np.asarray(pre.get("image_mean", CLIP_MEAN), dtype=np.float32)
        self.image_std = np.asarray(pre.get("image_std", CLIP_STD), dtype=np.float32)
        self.resample = int(pre.get("resample", Image.BICUBIC))
        self.eval()

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | Path = DEFAULT_SAFETY_CHECKER_DIR, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> "SafetyChecker":
        """Load a folder in the layout of the public ``CompVis/stable-diffusion-safety-checker`` release.

        :param device: default CPU. :param dtype: default float32.
        :raises FileNotFoundError: naming the folder and the files to put there.
        :raises ValueError: when the weights do not match the config (missing/unexpected/mis-shaped keys).
        """
        folder = Path(path)
        weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
        if not (folder / "config.json").is_file() or weights is None:
            raise FileNotFoundError(
                f"safety checker files not found in {folder.resolve()}: put config.json, preprocessor_config.json "
                f"and pytorch_model.bin (or model.safetensors) of the public {RELEASE_NAME} release there, "
                "or disable the safety check"
            )
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if "vision_config" not in config and "vision_config_dict" not in config:
            raise ValueError(f"{folder / 'config.json'} has no vision_config; is it the safety checker's config?")
        vision_config = CLIPVisionConfig.from_hf_dict(config.get("vision_config") or config["vision_config_dict"])
        pre_path = folder / "preprocessor_config.json"
        preprocess = json.loads(pre_path.read_text(encoding="utf-8")) if pre_path.is_file() else None
        if preprocess is None:
            log.info("%s not found; using CLIP's default preprocessing", pre_path)

        state_dict = _read_weights(weights)
        for key in ("concept_embeds", "special_care_embeds", "visual_projection.weight"):
            if key not in state_dict:
                raise ValueError(f"{weights} has no {key!r}; is it the safety checker's weights file?")
        with torch.device("meta"):
            model = cls(vision_config, projection_dim=state_dict["visual_projection.weight"].shape[0],
                        n_concepts=state_dict["concept_embeds"].shape[0],
                        n_special=state_dict["special_care_embeds"].shape[0], preprocess=preprocess)
        try:
            result = model.load_state_dict(state_dict, strict=False, assign=True)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{weights} does not match {folder / 'config.json'}: {err}") from None
        problems = [f"missing: {result.missing_keys}"] if result.missing_keys else []
        problems += [f"unexpected: {result.unexpected_keys}"] if result.unexpected_keys else []
        if problems:
            raise ValueError(f"{weights} does not match {folder / 'config.json'}: " + "; ".join(problems))
        model.vision_model.vision_model.embeddings.position_ids = torch.arange(
            model.vision_model.vision_model.embeddings.position_embedding.num_embeddings).unsqueeze(0)
        return model.to(device=device or "cpu", dtype=dtype or torch.float32).requires_grad_(False)

    # -- inference ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    def preprocess(self, images: Any) -> torch.Tensor:
        """CLIPFeatureExtractor as of transformers 4.19 (what the SD v1 scripts ran): shortest side
        to ``size`` with PIL bicubic (long side ``int(size * long / short)``; no resize when the short
        side already fits), center crop with top-left ``int((H - crop + 1) / 2)``, /255, normalise.

        :param images: PIL images or uint8 arrays ``[N, H, W, 3]``.
        :returns: ``[N, 3, crop, crop]`` float32 on the CPU.
        """
        batch = []
        images = _as_pil_list(images)
        if not images:
            raise ValueError("no images to check")
        for image in images:
            w, h = image.size
            short, long = min(w, h), max(w, h)
            if short != self.size:
                new_short, new_long = self.size, int(self.size * long / short)
                image = image.resize((new_short, new_long) if w <= h else (new_long, new_short), self.resample)
            w, h = image.size
            top, left = int((h - self.crop_size + 1) * 0.5), int((w - self.crop_size + 1) * 0.5)
            image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
            x = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)  # [S, S, 3]
            batch.append(((x - self.image_mean) / self.image_std).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(batch))

    @torch.no_grad()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` preprocessed images -> ``[N, projection_dim]`` (not normalised)."""
        pooled = self.vision_model(pixel_values.to(self.device, self.dtype)).pooler_output
        return self.visual_projection(pooled)

    @torch.no_grad()
    def cosines(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarity (float32, CPU) of each image to the special-care concepts ``[N, S]`` and
        to the concepts ``[N, C]``."""
        emb = F.normalize(self.image_embeds(pixel_values).float(), dim=-1)
        special = emb @ F.normalize(self.special_care_embeds.float(), dim=-1).T
        concept = emb @ F.normalize(self.concept_embeds.float(), dim=-1).T
        return special.cpu(), concept.cpu()

    def scores(self, images: Any) -> list[SafetyScores]:
        """The full result per image (decision, scores, triggered concepts)."""
        images = _as_pil_list(images)
        if not images:
            return []
        special, concept = self.cosines(self.preprocess(images))
        return score_concepts(special.numpy(), concept.numpy(), self.special_care_embeds_weights.float().cpu().numpy(),
                              self.concept_embeds_weights.float().cpu().numpy())

    def check(self, images: Any) -> list[bool]:
        """True for each image the reference would have replaced. Images: PIL or uint8 ``[N, H, W, 3]``."""
        return [s.nsfw for s in self.scores(images)]

    def filter_images(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """Replace flagged images by :func:`placeholder_image` of the same size."""
        flags = self.check(images)
        if any(flags):
            log.warning("safety checker: %d of %d images flagged and replaced", sum(flags), len(flags))
        return [placeholder_image(*im.size) if flag else im for im, flag in zip(images, flags)], flags


def _int_size(value: Any, key: str) -> int:
    """``size`` / ``crop_size`` as an int: old configs store an int, newer ones a dict."""
    if isinstance(value, dict):
        value = value.get(key, value.get("height"))
    return int(value)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def placeholder_image(width: int, height: int, text: str = "image withheld by the safety checker") -> Image.Image:
    """A neutral replacement image: flat grey, a thin frame and diagonal hatching, and ``text``
    centred when it fits. Drawn here, no external asset.

    :returns: RGB PIL image ``width x height``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"placeholder size must be positive, got {width}x{height}")
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    step = max(8, min(width, height) // 8)
    for offset in range(-height, width, step):
        draw.line([(offset, height), (offset + height, 0)], fill=(136, 136, 136), width=1)
    draw.rectangle([0, 0, width - 1, height - 1], outline=(100, 100, 100), width=max(1, min(width, height) // 64))
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    if tw + 8 <= width and th + 8 <= height:
        x, y = (width - tw) // 2 - left, (height - th) // 2 - top
        draw.rectangle([x + left - 4, y + top - 4, x + right + 4, y + bottom + 4], fill=(128, 128, 128))
        draw.text((x, y), text, fill=(32, 32, 32), font=font)
    return image
