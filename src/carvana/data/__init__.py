"""Data: the Carvana format and everything that reads or makes it.

  layout        - competition constants and file-name conventions
  rle           - Kaggle run-length encoding: the rules, parsing, decoding (train_masks.csv, submissions)
  rle_encoder   - the fast RLE encoder (exactly the classic Kaggle snippet's string); re-exported by rle
  postprocess   - probabilities at network size -> thresholded 1918x1280 mask (metric and submission)
  kaggle_credentials - where Kaggle credentials come from; redact() scrubs them from messages
  kaggle_client - the official kaggle API: clear errors, submit
  archives      - which competition zips exist, whether one is whole, safe unpacking
  notebook      - Kaggle Notebook: the mounted competition folder (CARVANA_INPUT), the working folder
  mounted       - the mounted competition files (zips and/or unpacked folders) as a dataset folder
  fetcher       - DatasetFetcher: folder / mount / Kaggle download / demo data; car-grouped split
  demo_car_model - the demo cars as 3-D models: random specs, geometry, the turntable camera
  demo_car      - draws one view of a demo car in its studio, with its exact mask
  demo_data     - the demo dataset in the exact Carvana layout, made of those cars
  files         - durable writes: atomic JSON records, directory fsync
  jpeg          - JPEG reading: truncation check, DCT-scaled decoding (--fast-decode), sizes
  resizing      - a decoded frame or mask at the network input size (DCT-reduced geometry, native padding)
  image_tensors - images as tensors: uint8 HWC <-> CHW, normalisation on the device, mirror padding
  datasets      - TrainImageDataset / TestImageDataset, true masks (CSV row or GIF), train augmentation
  class_datasets - --dataset oxford-pet | carla | folder: layouts, class-id masks, split, SegmentationDataset
  demo_trimap   - the demo cars as a 3-class trimap set (car / background / border) in the folder layout
  palette       - the fixed class colour palette and a legend naming the classes

Imports only the standard library, numpy, OpenCV, albumentations and torch: nothing above it.
"""
