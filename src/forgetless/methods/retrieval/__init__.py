"""Retrieval: a passage index (``index``) and the method that puts it in front of an unchanged model
(``method``)."""

from .method import Retrieval

__all__ = ["Retrieval"]
