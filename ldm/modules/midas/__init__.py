"""MiDaS monocular depth estimation (the DPT-Hybrid model of SD 2's depth2img), written here.

The reference builds it from ``timm`` (``vit_base_resnet50_384``) and the MiDaS repository; this
package has the same module tree and attribute names, so the 368 ``depth_model.*`` tensors of a
``512-depth-ema.ckpt`` load key for key, without ``timm`` (which needs torchvision):

* :mod:`.backbone`: the ViT-B/16 with a ResNet-50 (BiT-style: weight-standardised convolutions,
  GroupNorm, TensorFlow "same" padding) stem, and MiDaS's reassembly of four of its activations;
* :mod:`.dpt`: the DPT fusion blocks and depth head (``DPTDepthModel``);
* :mod:`.api`: ``MiDaSInference`` (the config's ``depth_stage_config`` target) and the MiDaS input
  transform (``AddMiDaS``).
"""
