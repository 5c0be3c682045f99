"""The lab: tiny models trained here from scratch, with known ground truth.

Used by ``ckptsel demo``, by the end-to-end tests, and to validate every metric.
"""
