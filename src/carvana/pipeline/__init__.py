"""``python main.py``: settings, recipe files, and the run they describe."""

from carvana.pipeline.binary import USER_ERRORS, run_pipeline

__all__ = ["USER_ERRORS", "run_pipeline"]
