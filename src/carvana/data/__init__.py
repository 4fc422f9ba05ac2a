"""Data: the Carvana format and everything that reads or makes it.

  layout        - competition constants and file-name conventions
  rle           - run-length encoding in the Kaggle format (train_masks.csv and the submission)
  postprocess   - probabilities at network size -> thresholded 1918x1280 mask (metric and submission)
  kaggle_credentials - where Kaggle credentials come from; redact() scrubs them from messages
  kaggle_client - the official kaggle API: clear errors, submit
  archives      - which competition zips exist, whether one is whole, safe unpacking
  notebook      - Kaggle Notebook: the mounted competition folder (CARVANA_INPUT), the working folder
  mounted       - the mounted competition files (zips and/or unpacked folders) as a dataset folder
  fetcher       - DatasetFetcher: folder / mount / Kaggle download / demo data; car-grouped split
  demo_car      - procedurally drawn 3-D cars in a studio, one view at a time
  demo_data     - the demo dataset in the exact Carvana layout, made of those cars
  files         - durable writes: atomic JSON records, directory fsync
  jpeg          - JPEG reading: truncation check, DCT-scaled decoding (--fast-decode), sizes
  datasets      - TrainImageDataset / TestImageDataset (OpenCV + albumentations)
  class_datasets - --dataset oxford-pet | carla | folder: layouts, class-id masks, split, SegmentationDataset
  demo_trimap   - the demo cars as a 3-class trimap set (car / background / border) in the folder layout
  palette       - the fixed class colour palette and a legend naming the classes

Imports only the standard library, numpy, OpenCV, albumentations and torch: nothing above it.
"""
