"""Carvana Image Masking Challenge pipeline.

Modules, in the order data flows through them:
  layout      - competition constants and file-name conventions
  fetcher     - DatasetFetcher: Kaggle download / demo data / car-grouped split
  demo_car    - procedurally drawn 3-D cars in a studio, one view at a time
  demo_data   - the demo dataset in the exact Carvana layout, made of those cars
  datasets    - TrainImageDataset / TestImageDataset (OpenCV + albumentations)
  model       - UNet1024
  losses      - BCE + Dice loss and the competition Dice metric
  classifier  - CarvanaClassifier: the train / predict loops
  callbacks   - the callback protocol and logging callbacks
  checkpoint  - ModelSaverCallback and checkpoint loading
  postprocess - upsample + threshold to 1918x1280 (shared by metric and submission)
  predictions - PredictionsSaverCallback: streaming, resumable submit.csv.gz
  rle         - run-length encoding in the Kaggle format
  submission  - validate, score locally, upload
  kaggle_client - the official kaggle API: credentials, clear errors, submit
  sharded     - prediction into one file, in one process or sharded under torchrun
  distributed - torch.distributed glue (no-ops in a single process)
  logging_callbacks - console line, metrics.csv, TensorBoard, preview PNGs
  pipeline    - the straight-line run behind `python main.py`
  cli         - command-line overrides of main.py's settings
"""

__version__ = "0.1.0"
