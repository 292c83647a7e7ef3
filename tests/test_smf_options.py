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


def test_rows_kept_off_limits_are_never_selected_and_a_new_set_takes_effect():
    from types import SimpleNamespace

    from forgetless.methods.smf import select_read_slots

    torch.manual_seed(0)
    reads = torch.randint(0, 50, (400,))
    mem = SimpleNamespace(n_slots=50, access_log=SimpleNamespace(last_indices=reads))
    m = make_method("smf", lr=1.0, ranking="tf", top_t=8)
    for excluded in (torch.tensor([3, 7, 11, 49]), torch.arange(0, 50, 2)):
        m.excluded = {"x": excluded}  # a new set of rows kept off-limits: the cached mask follows it
        got = m._select("x", mem)
        assert not torch.isin(got, excluded).any()
        assert torch.equal(got, select_read_slots(reads[~torch.isin(reads, excluded)], "tf", 8))
        assert got.numel() == 8
