"""Models: the networks and the one place that builds them from a config.

  unet1024 - UNet1024, the classic Carvana U-Net
  registry - ModelConfig and build_model(config): every architecture by name

Imports nothing of carvana but itself.
"""
