"""``sgm.modules.diffusionmodules.openaimodel.UNetModel``: the one UNet
(:class:`ldm.modules.diffusionmodules.openaimodel.UNetModel`) with sgm's constructor conventions.

What sgm's configs say differently from ldm's, and how it maps:

* no ``image_size`` (unused by the network anyway);
* a per-level ``transformer_depth`` list (``[1, 2, 10]`` for the SDXL base: level 0 has no
  attention, so its entry is unused), the middle block taking the **last** entry;
  ``transformer_depth_middle`` may only repeat that;
* ``context_dim`` set means spatial transformers (``use_spatial_transformer`` is not needed); a
  per-level list that repeats one width (the refiner's ``[1280, 1280, 1280, 1280]``) is that width;
* ``use_fairscale_checkpoint`` / ``offload_to_cpu`` (training options) are accepted and unused.
"""
from __future__ import annotations

from typing import Any, Optional

from ldm.modules.diffusionmodules.openaimodel import UNetModel as _UNetModel

__all__ = ["UNetModel"]


class UNetModel(_UNetModel):
    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks, attention_resolutions,
                 *args, image_size: Any = None, transformer_depth=1, transformer_depth_middle: Optional[int] = None,
                 context_dim=None, use_spatial_transformer: Optional[bool] = None,
                 use_fairscale_checkpoint: bool = False, offload_to_cpu: bool = False, **kwargs):
        if not isinstance(transformer_depth, int):
            transformer_depth = [int(d) for d in transformer_depth]
        last = transformer_depth if isinstance(transformer_depth, int) else transformer_depth[-1]
        if transformer_depth_middle is not None and int(transformer_depth_middle) != last:
            raise ValueError(f"transformer_depth_middle {transformer_depth_middle} differs from the last level's depth "
                             f"{last}; this UNet's middle block takes the last level's depth")
        if context_dim is not None and not isinstance(context_dim, int):
            widths = [int(c) for c in context_dim]
            context_dim = widths[0] if len(set(widths)) == 1 else widths
        if use_spatial_transformer is None:
            use_spatial_transformer = context_dim is not None
        super().__init__(image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                         *args, transformer_depth=transformer_depth, context_dim=context_dim,
                         use_spatial_transformer=use_spatial_transformer, **kwargs)
