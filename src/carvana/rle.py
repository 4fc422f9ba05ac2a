"""Kept for old imports: ``carvana.rle`` is ``carvana.data.rle``."""

from carvana.data.rle import RLEError, rle_decode, rle_encode, rle_to_runs  # noqa: F401
