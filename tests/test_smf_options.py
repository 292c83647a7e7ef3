"""SMF options kept in their own block: rows kept off-limits (protect, max_doc_rate)."""

import pytest
import torch

from forgetless.errors import ConfigError
from forgetless.methods import make_method
from forgetless.methods.base import MethodContext
from forgetless.methods.smf import excluded_rows


class _Mem:
    n_slots = 6


def test_max_doc_rate_excludes_rows_read_in_too_many_background_documents():
    idf = {"m": (torch.tensor([0, 10, 5, 6, 1, 9]), 10)}  # doc rates 0, 1, .5, .6, .1, .9
    out = excluded_rows(None, MethodContext(), {"m": _Mem()}, protect=0.0, max_doc_rate=0.5, idf_stats=idf)
    assert out["m"].tolist() == [1, 3, 5]
    assert excluded_rows(None, MethodContext(), {"m": _Mem()}, 0.0, 1.0, idf) == {}


def test_bad_options_are_one_clear_error():
    with pytest.raises(ConfigError):
        make_method("smf", lr=1.0, protect=1.5)
    with pytest.raises(ConfigError):
        make_method("smf", lr=1.0, max_doc_rate=0.0)
    with pytest.raises(ConfigError):
        make_method("smf", lr=1.0, ranking="random")
    m = make_method("smf", lr=1.0, protect=0.5)
    assert m.describe()["protect"] == 0.5 and m.describe()["max_doc_rate"] == 1.0
    assert make_method("smf").describe()["protect"] == 0.9  # the default (docs/smf.md)
