import pytest
import torch

from nemokern.cli import main
from nemokern.trainers.losses import rloo_advantages


def _rloo_loop(scores, valid):
    out = torch.zeros_like(scores, dtype=torch.float64)
    for p in range(scores.shape[0]):
        idx = [j for j in range(scores.shape[1]) if valid[p, j]]
        if len(idx) < 2:
            continue
        for i in idx:
            others = [float(scores[p, j]) for j in idx if j != i]
            out[p, i] = float(scores[p, i]) - sum(others) / len(others)
    return out


@pytest.mark.parametrize("p,k", [(1, 1), (3, 2), (5, 4), (7, 9)])
def test_rloo_advantages_match_loop(p, k):
    g = torch.Generator().manual_seed(p * 10 + k)
    scores = torch.randn(p, k, generator=g, dtype=torch.float64) * 3
    valid = torch.rand(p, k, generator=g) > 0.3
    valid[0] = True  # one prompt with every sample valid
    torch.testing.assert_close(
        rloo_advantages(scores, valid), _rloo_loop(scores, valid), rtol=0, atol=1e-12
    )


def test_rloo_all_invalid_or_single_gives_zero():
    scores = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    valid = torch.tensor([[False, False, False], [False, True, False]])
    assert rloo_advantages(scores, valid).abs().sum() == 0


def test_rloo_invalid_samples_never_leak_into_valid_ones():
    # A truncated (invalid) sample may carry a non-finite score (e.g. a NaN KL of a degenerate
    # response); it is excluded from the baseline, so it must not turn the others' advantages NaN.
    scores = torch.tensor([[1.0, float("nan"), 3.0, 6.0], [float("inf"), 2.0, 4.0, float("-inf")]])
    valid = torch.tensor([[True, False, True, True], [False, True, True, False]])
    adv = rloo_advantages(scores, valid)
    finite = torch.where(valid, scores, torch.zeros_like(scores))
    torch.testing.assert_close(adv, _rloo_loop(finite, valid).float(), rtol=0, atol=1e-6)


def test_rloo_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[P, k\]"):
        rloo_advantages(torch.zeros(4), torch.ones(4, dtype=torch.bool))


def test_selfcheck_runs_and_checks_pass(capsys):
    assert main(["selfcheck", "--max-new-tokens", "12", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "[6/6]" in out and "OK" in out


def test_selfcheck_keeps_checkpoint(tmp_path):
    from nemokern.model import Llama

    assert main(["selfcheck", "--max-new-tokens", "4", "--k", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "config.json").exists()
    Llama.from_pretrained(tmp_path)
