"""Continual-learning metrics over the accuracy matrix (forgetless.evaluate.metrics).

Every expected number is worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forgetless.evaluate.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forgetting_curve,
    forgetting_per_experience,
    forward_transfer,
    intransigence,
    learning_accuracy,
    summarize,
)

NAN = float("nan")

# R[i][j] = accuracy on experience j after training through experience i (0-based).
R3 = [
    [0.80, 0.30, 0.10],
    [0.85, 0.90, 0.40],
    [0.50, 0.70, 0.95],
]
B3 = [0.20, 0.25, 0.30]
JOINT3_DIAG = [0.85, 0.92, 0.96]


def approx(x):
    return pytest.approx(x, abs=1e-12)


# ----------------------------------------------------------------------------- 3 x 3 by hand


def test_3x3_average_accuracy():
    # last row: (0.50 + 0.70 + 0.95) / 3 = 2.15 / 3
    assert average_accuracy(R3) == approx(2.15 / 3)


def test_3x3_backward_transfer():
    # ((R[2][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2 = ((0.50 - 0.80) + (0.70 - 0.90)) / 2
    #   = (-0.30 - 0.20) / 2 = -0.25
    assert backward_transfer(R3) == approx(-0.25)


def test_3x3_forward_transfer():
    # ((R[0][1] - b[1]) + (R[1][2] - b[2])) / 2 = ((0.30 - 0.25) + (0.40 - 0.30)) / 2
    #   = (0.05 + 0.10) / 2 = 0.075
    assert forward_transfer(R3, B3) == approx(0.075)


def test_3x3_forgetting():
    # f_0 = max(R[0][0], R[1][0]) - R[2][0] = max(0.80, 0.85) - 0.50 = 0.35
    # f_1 = max(R[1][1]) - R[2][1] = 0.90 - 0.70 = 0.20
    # F = (0.35 + 0.20) / 2 = 0.275   (differs from -BWT = 0.25: the max is 0.85, not R[0][0])
    assert forgetting_per_experience(R3) == [approx(0.35), approx(0.20)]
    assert forgetting(R3) == approx(0.275)


def test_3x3_forgetting_curve():
    # F_2 (after experience 2): max(R[0][0]) - R[1][0] = 0.80 - 0.85 = -0.05 (it improved)
    # F_3 = F = 0.275
    curve = forgetting_curve(R3)
    assert curve == [approx(-0.05), approx(0.275)]
    assert curve[-1] == approx(forgetting(R3))


def test_3x3_learning_accuracy():
    # diagonal: (0.80 + 0.90 + 0.95) / 3 = 2.65 / 3
    assert learning_accuracy(R3) == approx(2.65 / 3)


def test_3x3_intransigence_vector_and_matrix():
    # I_k = a*_k - R[k][k] = [0.85 - 0.80, 0.92 - 0.90, 0.96 - 0.95] = [0.05, 0.02, 0.01]
    # mean = 0.08 / 3
    expected = {"per_experience": [approx(0.05), approx(0.02), approx(0.01)], "mean": approx(0.08 / 3)}
    assert intransigence(R3, JOINT3_DIAG) == expected
    # the joint baseline's full matrix: only its diagonal is used (NaN elsewhere is fine)
    joint_matrix = [
        [0.85, NAN, NAN],
        [0.70, 0.92, NAN],
        [0.60, 0.80, 0.96],
    ]
    assert intransigence(R3, joint_matrix) == expected
    assert intransigence(R3, np.array(joint_matrix)) == expected


def test_3x3_summarize():
    s = summarize(R3, b=B3, joint=JOINT3_DIAG)
    assert s == {
        "acc": approx(2.15 / 3),
        "bwt": approx(-0.25),
        "fwt": approx(0.075),
        "forgetting": approx(0.275),
        "learning_accuracy": approx(2.65 / 3),
        "intransigence": approx(0.08 / 3),
    }
    # without b / joint the metrics that need them are left out
    assert set(summarize(R3)) == {"acc", "bwt", "forgetting", "learning_accuracy"}


def test_numpy_input_returns_python_floats():
    R = np.array(R3, dtype=np.float32)
    s = summarize(R, b=np.array(B3), joint=np.array(JOINT3_DIAG))
    for v in s.values():
        assert type(v) is float
    assert all(type(v) is float for v in forgetting_per_experience(R))
    assert all(type(v) is float for v in forgetting_curve(R))
    assert all(type(v) is float for v in intransigence(R, JOINT3_DIAG)["per_experience"])
    assert s["bwt"] == pytest.approx(-0.25, abs=1e-6)


# ----------------------------------------------------------------------------- edge cases


def test_T1():
    R = [[0.7]]
    assert average_accuracy(R) == 0.7
    assert learning_accuracy(R) == 0.7
    assert backward_transfer(R) == 0.0
    assert forward_transfer(R, [0.1]) == 0.0
    assert forgetting(R) == 0.0
    assert forgetting_per_experience(R) == []
    assert forgetting_curve(R) == []
    # I_1 = 0.9 - 0.7 = 0.2
    assert intransigence(R, [0.9]) == {"per_experience": [approx(0.2)], "mean": approx(0.2)}
    assert summarize(R, b=[0.1]) == {"acc": 0.7, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0, "learning_accuracy": 0.7}
    # with lower-is-better scores the undefined metrics are still 0.0 and ACC stays in its units
    assert summarize(R, b=[0.1], higher_is_better=False)["acc"] == 0.7
    assert backward_transfer(R, higher_is_better=False) == 0.0


def test_T2():
    R = [
        [0.7, 0.4],
        [0.6, 0.8],
    ]
    b = [0.1, 0.2]
    # ACC = (0.6 + 0.8) / 2 = 0.7
    assert average_accuracy(R) == approx(0.7)
    # BWT = R[1][0] - R[0][0] = 0.6 - 0.7 = -0.1
    assert backward_transfer(R) == approx(-0.1)
    # FWT = R[0][1] - b[1] = 0.4 - 0.2 = 0.2
    assert forward_transfer(R, b) == approx(0.2)
    # f_0 = 0.7 - 0.6 = 0.1
    assert forgetting_per_experience(R) == [approx(0.1)]
    assert forgetting(R) == approx(0.1)
    assert forgetting_curve(R) == [approx(0.1)]
    # LA = (0.7 + 0.8) / 2 = 0.75
    assert learning_accuracy(R) == approx(0.75)


# ----------------------------------------------------------------------------- lower is better

# NLL[i][j] after training through i, on experience j; lower is better.
N3 = [
    [2.0, 3.5, 4.0],
    [2.4, 1.8, 3.0],
    [2.6, 2.1, 1.5],
]
NB3 = [4.0, 4.2, 4.4]


def test_nll_by_hand():
    # BWT = mean decrease of NLL: ((2.0 - 2.6) + (1.8 - 2.1)) / 2 = (-0.6 - 0.3) / 2 = -0.45
    assert backward_transfer(N3, higher_is_better=False) == approx(-0.45)
    # FWT = mean decrease vs base: ((4.2 - 3.5) + (4.4 - 3.0)) / 2 = (0.7 + 1.4) / 2 = 1.05
    assert forward_transfer(N3, NB3, higher_is_better=False) == approx(1.05)
    # f_0 = 2.6 - min(2.0, 2.4) = 0.6; f_1 = 2.1 - 1.8 = 0.3; F = 0.45
    assert forgetting_per_experience(N3, higher_is_better=False) == [approx(0.6), approx(0.3)]
    assert forgetting(N3, higher_is_better=False) == approx(0.45)
    # F_2 = 2.4 - 2.0 = 0.4; F_3 = 0.45
    assert forgetting_curve(N3, higher_is_better=False) == [approx(0.4), approx(0.45)]
    # I_k = R[k][k] - a*_k (excess NLL): [2.0 - 1.9, 1.8 - 1.7, 1.5 - 1.4] = [0.1, 0.1, 0.1]
    got = intransigence(N3, [1.9, 1.7, 1.4], higher_is_better=False)
    assert got == {"per_experience": [approx(0.1)] * 3, "mean": approx(0.1)}
    # level metrics stay in NLL units: ACC = (2.6 + 2.1 + 1.5) / 3, LA = (2.0 + 1.8 + 1.5) / 3
    assert average_accuracy(N3, higher_is_better=False) == approx(6.2 / 3)
    assert learning_accuracy(N3, higher_is_better=False) == approx(5.3 / 3)


def test_nll_equals_metrics_of_negated_matrix():
    neg = [[-x for x in row] for row in N3]
    neg_b = [-x for x in NB3]
    assert backward_transfer(N3, higher_is_better=False) == approx(backward_transfer(neg))
    assert forward_transfer(N3, NB3, higher_is_better=False) == approx(forward_transfer(neg, neg_b))
    assert forgetting(N3, higher_is_better=False) == approx(forgetting(neg))
    assert forgetting_curve(N3, higher_is_better=False) == [approx(x) for x in forgetting_curve(neg)]
    # BWT and FWT are linear, so the flag flips their sign on the same matrix:
    # BWT(N3) = ((2.6 - 2.0) + (2.1 - 1.8)) / 2 = 0.45; FWT(N3) = ((3.5 - 4.2) + (3.0 - 4.4)) / 2 = -1.05
    assert backward_transfer(N3) == approx(0.45)
    assert backward_transfer(N3, higher_is_better=False) == approx(-backward_transfer(N3))
    assert forward_transfer(N3, NB3) == approx(-1.05)
    assert forward_transfer(N3, NB3, higher_is_better=False) == approx(-forward_transfer(N3, NB3))
    # forgetting is not linear (max vs min): read as accuracy, N3 "forgets" -0.25, not -0.45
    # f_0 = max(2.0, 2.4) - 2.6 = -0.2; f_1 = 1.8 - 2.1 = -0.3
    assert forgetting(N3) == approx(-0.25)


def test_summarize_nll():
    s = summarize(N3, b=NB3, joint=[1.9, 1.7, 1.4], higher_is_better=False)
    assert s == {
        "acc": approx(6.2 / 3),
        "bwt": approx(-0.45),
        "fwt": approx(1.05),
        "forgetting": approx(0.45),
        "learning_accuracy": approx(5.3 / 3),
        "intransigence": approx(0.1),
    }


# ----------------------------------------------------------------------------- ignored cells


def test_nan_allowed_in_ignored_cells():
    # only R[0][2] is beyond the first superdiagonal of a 3 x 3 matrix
    R = [row[:] for row in R3]
    R[0][2] = NAN
    assert summarize(R, b=B3, joint=JOINT3_DIAG) == summarize(R3, b=B3, joint=JOINT3_DIAG)

    # 4 x 4: NaN everywhere above the first superdiagonal
    R4 = [
        [0.9, 0.2, NAN, NAN],
        [0.8, 0.9, 0.3, NAN],
        [0.7, 0.8, 0.9, 0.4],
        [0.6, 0.7, 0.8, 0.9],
    ]
    # BWT = ((0.6-0.9) + (0.7-0.9) + (0.8-0.9)) / 3 = -0.6 / 3 = -0.2
    assert backward_transfer(R4) == approx(-0.2)
    # FWT with b = 0.1: ((0.2-0.1) + (0.3-0.1) + (0.4-0.1)) / 3 = 0.6 / 3 = 0.2
    assert forward_transfer(R4, [0.1] * 4) == approx(0.2)
    # f = [0.9-0.6, 0.9-0.7, 0.9-0.8] = [0.3, 0.2, 0.1], F = 0.2
    assert forgetting(R4) == approx(0.2)
    # F_2 = 0.9-0.8 = 0.1; F_3 = ((0.9-0.7) + (0.9-0.8)) / 2 = 0.15; F_4 = 0.2
    assert forgetting_curve(R4) == [approx(0.1), approx(0.15), approx(0.2)]


def test_nan_superdiagonal_only_matters_for_fwt():
    R = [
        [0.7, NAN],
        [0.6, 0.8],
    ]
    # everything but FWT is computable
    assert summarize(R) == {"acc": approx(0.7), "bwt": approx(-0.1), "forgetting": approx(0.1), "learning_accuracy": approx(0.75)}
    with pytest.raises(ValueError, match="superdiagonal"):
        forward_transfer(R, [0.1, 0.2])
    with pytest.raises(ValueError, match="superdiagonal"):
        summarize(R, b=[0.1, 0.2])


# ----------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "R",
    [
        [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]],  # 2 x 3
        [[0.1, 0.2], [0.3]],  # ragged
        [],  # T = 0
        [[]],  # 1 x 0
        [0.1, 0.2],  # 1-D
        [[[0.1]]],  # 3-D
        [["a", 0.2], [0.3, 0.4]],  # not numbers
    ],
)
def test_invalid_shape_raises(R):
    for fn in (average_accuracy, backward_transfer, forgetting, forgetting_curve, learning_accuracy, summarize):
        with pytest.raises(ValueError):
            fn(R)


def test_nan_on_diagonal_raises():
    R = [row[:] for row in R3]
    R[1][1] = NAN
    for fn in (average_accuracy, backward_transfer, forgetting, forgetting_per_experience, forgetting_curve, learning_accuracy, summarize):
        with pytest.raises(ValueError, match=r"R\[1\]\[1\]"):
            fn(R)
    with pytest.raises(ValueError):
        forward_transfer(R, B3)
    with pytest.raises(ValueError):
        intransigence(R, JOINT3_DIAG)


def test_non_finite_below_diagonal_raises():
    for bad in (NAN, math.inf, -math.inf):
        R = [row[:] for row in R3]
        R[2][0] = bad
        with pytest.raises(ValueError, match=r"R\[2\]\[0\]"):
            backward_transfer(R)
        with pytest.raises(ValueError, match=r"R\[2\]\[0\]"):
            average_accuracy(np.array(R))


def test_wrong_b_raises():
    with pytest.raises(ValueError, match="length"):
        forward_transfer(R3, [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        forward_transfer(R3, [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="length"):
        summarize(R3, b=[[0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="finite"):
        forward_transfer(R3, [0.1, NAN, 0.3])


def test_wrong_joint_raises():
    with pytest.raises(ValueError):
        intransigence(R3, [0.9, 0.9])
    with pytest.raises(ValueError):
        intransigence(R3, [[0.9, 0.9], [0.9, 0.9]])
    with pytest.raises(ValueError, match="finite"):
        intransigence(R3, [0.9, NAN, 0.9])
    with pytest.raises(ValueError, match="finite"):
        intransigence(R3, [[0.9, 0, 0], [0, NAN, 0], [0, 0, 0.9]])
    with pytest.raises(ValueError):
        summarize(R3, joint=[0.9])
