"""Submission: from probabilities to a validated, uploaded Kaggle file.

  predictions - PredictionsSaverCallback: streaming, resumable submit.csv.gz
  sharded     - prediction into one file, in one process or sharded under torchrun
  validate    - read, validate, score locally, upload (``python -m carvana.submission``)

Imports carvana.data, carvana.models and carvana.training only.
"""
