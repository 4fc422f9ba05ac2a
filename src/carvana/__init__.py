"""Carvana Image Masking Challenge pipeline.

Subpackages, each with one job; imports point down this list only:

  data/        - the Carvana format, fetching (Kaggle or demo), datasets
  models/      - the networks and build_model(config)
  training/    - CarvanaClassifier, losses, callbacks, checkpoints, torchrun glue
  submission/  - streaming submit.csv.gz, sharding, validate / score / upload

On top of them:

  pipeline     - the straight-line run behind `python main.py`
  cli          - command-line overrides of main.py's settings
  segment      - `python -m carvana.segment`: your photos -> masks, cutouts (photos: reading, geometry, outputs)
  segmenter    - segment's model side: a checkpoint's network, photos -> probabilities
  export       - `python -m carvana.export`: ONNX (uint8 RGB in, probabilities out) with a parity check
  rle          - re-export of carvana.data.rle (old import path)
"""

__version__ = "0.1.0"
