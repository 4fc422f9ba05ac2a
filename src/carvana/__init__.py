"""Carvana Image Masking Challenge pipeline.

Modules, in the order data flows through them:
  layout      - competition constants and file-name conventions
  fetcher     - DatasetFetcher: Kaggle download / demo data / car-grouped split
  demo_data   - procedurally drawn cars in the exact Carvana layout
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
"""

__version__ = "0.1.0"
