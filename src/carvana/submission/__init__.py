"""Submission: from probabilities to a validated, uploaded Kaggle file.

  rows        - probability maps -> upsampled, thresholded, RLE-encoded rows
  fingerprint - what a prediction was made from (components, weights digest, finished-file records)
  gzip_stream - one gzip member written chunk by chunk, resumable after kill -9
  chunk_pipeline - rows made on a thread pool, collected in order, written chunk by chunk by one thread
  predictions - PredictionsSaverCallback: streaming, resumable submit.csv.gz
  sharded     - prediction into one file, in one process or sharded under torchrun
  reading     - reading img,rle_mask CSVs row by row (gzip or plain); SubmissionError
  scoring     - the competition's mean Dice of a submission against a solution CSV, from runs
  validate    - validate a submission, upload only a valid one, the CLI (``python -m carvana.submission``)
  masks       - multi-class prediction: one indexed-palette PNG per image, streamed and resumable

Imports carvana.data, carvana.models and carvana.training only.
"""
