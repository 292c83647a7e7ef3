"""Model merging: pure merge rules over dicts of tensors (``rules``) and the method that trains one
expert per experience and merges them (``method``)."""

from .method import MERGE_METHODS, Merge

__all__ = ["MERGE_METHODS", "Merge"]
