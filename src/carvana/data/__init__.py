"""Data: the Carvana format and everything that reads or makes it.

  sources/      - where the data comes from: a folder, Kaggle Notebook mounts, the Kaggle API, archives
  demo/         - the demo data: drawn cars in the exact Carvana layout (and as a 3-class trimap set)

  layout        - competition constants and file-name conventions
  rle           - Kaggle run-length encoding: the rules, parsing, decoding (train_masks.csv, submissions)
  rle_encoder   - the fast RLE encoder (exactly the classic Kaggle snippet's string); re-exported by rle
  postprocess   - probabilities at network size -> thresholded 1918x1280 mask (metric and submission)
  files         - durable writes: one atomic write (temp name, fsync, rename, directory fsync)
  secrets       - the one redact(): passwords in URLs, tokens, credential values
  pseudo        - pseudo-label stores: a teacher's probabilities, keyed per photo, streamed
  photos        - any photo in, masks and cutouts out (carvana.segment)
  jpeg          - JPEG reading: truncation check, DCT-scaled decoding (--fast-decode), sizes
  resizing      - a decoded frame or mask at the network input size (DCT-reduced geometry, native padding)
  image_tensors - images as tensors: uint8 HWC <-> CHW, normalisation on the device, mirror padding
  datasets      - TrainImageDataset / TestImageDataset, true masks (CSV row or GIF), train augmentation
  class_datasets - --dataset oxford-pet | carla | folder: layouts, class-id masks, split, SegmentationDataset
  palette       - the fixed class colour palette and a legend naming the classes

Imports only the standard library, numpy, OpenCV, albumentations and torch: nothing above it.
"""
