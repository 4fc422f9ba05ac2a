"""Submission: from probabilities to a validated, uploaded Kaggle file.

  rows        - probability maps -> upsampled, thresholded, RLE-encoded rows
  fingerprint - what a prediction was made from (components, weights digest, finished-file records)
  gzip_stream - one gzip member written chunk by chunk, resumable after kill -9
  predictions - PredictionsSaverCallback: streaming, resumable submit.csv.gz
  sharded     - prediction into one file, in one process or sharded under torchrun
  validate    - read, validate, score locally, upload (``python -m carvana.submission``)
  masks       - multi-class prediction: one indexed-palette PNG per image, streamed and resumable

Imports carvana.data, carvana.models and carvana.training only.
"""
