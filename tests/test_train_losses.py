"""Reward losses against independent float64 formulas (element loops, boolean indexing), forward
and backward, on awkward sizes, with ties and masked attributes."""

import math

import pytest
import torch

from nemokern.trainers.losses import (
    ATTRIBUTES,
    HELPFULNESS,
    IGNORE_LABEL,
    bradley_terry_loss,
    pair_accuracy,
    regression_loss,
)


def _labels(g, b, k, p_masked):
    labels = torch.randint(0, 5, (b, k), generator=g).double()
    labels[torch.rand(b, k, generator=g) < p_masked] = IGNORE_LABEL
    return labels


def _regression_ref(out, labels, columns):
    # Python sum over the (row, column) pairs that carry a label.
    terms = [
        (out[i, j] - labels[i, j]) ** 2
        for i in range(out.shape[0])
        for j in range(out.shape[1])
        if labels[i, j] != IGNORE_LABEL and (columns is None or j in columns)
    ]
    return sum(terms) / len(terms) if terms else out.sum() * 0, len(terms)


@pytest.mark.parametrize(
    "b,k,columns",
    [
        (1, 9, None),
        (13, 9, None),
        (37, 9, (HELPFULNESS,)),
        (7, 3, (0, 2)),
        (29, 9, (4, 5, 6, 7, 8)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_regression_matches_float64_formula(b, k, columns, dtype):
    g = torch.Generator().manual_seed(b * 100 + k)
    labels = _labels(g, b, k, 0.35)
    labels[:, :4] = (
        IGNORE_LABEL if k == 9 else labels[:, :4]
    )  # HelpSteer2: the first four unlabelled
    base = torch.randn(b, k, generator=g, dtype=torch.float64) * 2 + 2
    out = base.to(dtype).requires_grad_()
    ref_in = base.to(dtype).double().requires_grad_()
    value = regression_loss(out, labels.to(torch.int64), columns=columns)
    ref, n = _regression_ref(ref_in, labels, columns)
    assert int(value.count) == n
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(value.loss.double(), ref.detach(), rtol=tol, atol=tol)
    upstream = 0.7
    (value.loss * upstream).backward()
    (ref * upstream).backward()
    torch.testing.assert_close(out.grad.double(), ref_in.grad, rtol=tol, atol=tol)
    masked = labels == IGNORE_LABEL
    assert (out.grad[masked] == 0).all()


def test_regression_all_masked_is_zero_not_nan():
    out = torch.randn(5, 9, requires_grad=True)
    value = regression_loss(out, torch.full((5, 9), IGNORE_LABEL))
    value.loss.backward()
    assert value.loss.item() == 0 and int(value.count) == 0 and (out.grad == 0).all()


def test_regression_helpfulness_only_ignores_other_labels():
    out = torch.zeros(2, 9)
    labels = torch.full((2, 9), 4)
    labels[:, HELPFULNESS] = torch.tensor([1, 3])
    value = regression_loss(out, labels, columns=(HELPFULNESS,))
    assert value.loss.item() == pytest.approx((1 + 9) / 2) and int(value.count) == 2
    assert ATTRIBUTES[HELPFULNESS] == "helpfulness" and len(ATTRIBUTES) == 9


def test_regression_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        regression_loss(torch.zeros(3, 9), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="columns"):
        regression_loss(torch.zeros(3, 9), torch.zeros(3, 9), columns=(9,))


def _bt_ref(rc, rr, strength, kind):
    total, n = 0, 0
    for i in range(rc.shape[0]):
        m = None if strength is None else abs(float(strength[i]))
        if m == 0:
            continue
        d = rc[i] - rr[i] - (m if kind == "margin" else 0)
        term = torch.log1p(torch.exp(-d))  # -log sigmoid(d), written the other way round
        total = total + (m if kind == "scaled" else 1) * term
        n += 1
    return (total / n if n else rc.sum() * 0), n


@pytest.mark.parametrize("p", [1, 2, 17, 131])
@pytest.mark.parametrize("kind", ["regular", "margin", "scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bradley_terry_matches_float64_formula(p, kind, dtype):
    g = torch.Generator().manual_seed(p * 7 + len(kind))
    rc0 = torch.randn(p, generator=g, dtype=torch.float64) * 3
    rr0 = torch.randn(p, generator=g, dtype=torch.float64) * 3
    strength = torch.randint(-3, 4, (p,), generator=g)
    if p > 1:
        strength[0] = 0  # at least one tie
    rc, rr = rc0.to(dtype).requires_grad_(), rr0.to(dtype).requires_grad_()
    rc_ref, rr_ref = (
        rc0.to(dtype).double().requires_grad_(),
        rr0.to(dtype).double().requires_grad_(),
    )
    value = bradley_terry_loss(rc, rr, strength, kind=kind)
    ref, n = _bt_ref(rc_ref, rr_ref, strength, kind)
    assert int(value.count) == n
    tol = 1e-12 if dtype == torch.float64 else 3e-6
    torch.testing.assert_close(value.loss.double(), ref.detach(), rtol=tol, atol=tol)
    value.loss.backward()
    ref.backward()
    torch.testing.assert_close(rc.grad.double(), rc_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(rr.grad.double(), rr_ref.grad, rtol=tol, atol=tol)
    ties = strength == 0
    assert (rc.grad[ties] == 0).all() and (rr.grad[ties] == 0).all()


def test_bradley_terry_without_strength_counts_every_pair():
    rc = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    value = bradley_terry_loss(rc, rr)
    expected = sum(math.log1p(math.exp(-d)) for d in (1.0, 0.0, -3.0)) / 3
    assert int(value.count) == 3 and value.loss.item() == pytest.approx(expected, rel=1e-14)
    assert torch.autograd.gradcheck(lambda x: bradley_terry_loss(x, rr).loss, (rc,))


def test_bradley_terry_gradcheck_each_kind():
    g = torch.Generator().manual_seed(3)
    rc = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([-3, 0, 1, 2, -1, 3])
    for kind in ("regular", "margin", "scaled"):
        assert torch.autograd.gradcheck(
            lambda a, b, kind=kind: bradley_terry_loss(a, b, s, kind=kind).loss, (rc, rr)
        )


def test_bradley_terry_all_ties_is_zero():
    rc = torch.randn(4, requires_grad=True)
    value = bradley_terry_loss(rc, torch.zeros(4), torch.zeros(4), kind="scaled")
    value.loss.backward()
    assert value.loss.item() == 0 and int(value.count) == 0 and (rc.grad == 0).all()


def test_bradley_terry_margin_and_scaled_differ_as_the_recipe_says():
    rc, rr, s = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([-2])
    reg = bradley_terry_loss(rc, rr, s).loss.item()
    assert bradley_terry_loss(rc, rr, s, kind="scaled").loss.item() == pytest.approx(2 * reg)
    assert bradley_terry_loss(rc, rr, s, kind="margin").loss.item() == pytest.approx(
        math.log1p(math.exp(1.0))
    )


def test_bradley_terry_errors():
    with pytest.raises(ValueError, match="strength"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), kind="margin")
    with pytest.raises(ValueError, match="kind"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), kind="hinge")
    with pytest.raises(ValueError, match=r"\[P\]"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="strength"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4))


def test_pair_accuracy_counts_ties_as_wrong():
    acc = pair_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0]))
    assert acc.item() == 0.5


def test_pair_accuracy_leaves_preference_ties_out():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.5, 4.0, -1.0])
    # strength 0 (pairs 2 and 3): no better response; of pairs 1 and 4, both right
    assert pair_accuracy(chosen, rejected, torch.tensor([2.0, 0.0, 0.0, 1.0])).item() == 1.0
    assert pair_accuracy(chosen, rejected, torch.zeros(4)).item() == 0.0  # all ties: weight 0
