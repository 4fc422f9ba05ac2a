"""Models: the networks and the one place that builds them from a config.

  unet1024      - UNet1024, the classic Carvana U-Net
  unet_original - the 2015 U-Net (valid convolutions, mirror-padded input)
  smp_nets      - segmentation-models-pytorch networks and their encoder weights
  registry      - ModelConfig and build_model(config): every architecture by name

Imports nothing of carvana but itself.
"""
