"""The verifier's math: greedy acceptance, and speculative sampling emitting exactly the target's
distribution (chi-square over many draws, with a wrong rule as a negative control), n-gram lookup."""
import pytest
import torch

from leanlm.spec import verify
from leanlm.spec.proposer import ngram_lookup
from leanlm.spec.verify import greedy_accept, speculative_sample

V, K, TRIALS = 6, 2, 12000


def test_greedy_accept():
    assert greedy_accept([5, 6, 7], [5, 6]) == [5, 6, 7]       # all kept + bonus
    assert greedy_accept([5, 9, 7], [5, 6]) == [5, 9]          # first mismatch: the target's token
    assert greedy_accept([4, 6, 7], [5, 6]) == [4]


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= statistic) for Pearson's chi-square of counts against probs (df = cells - 1)."""
    n = counts.sum()
    expected = probs.double() * n
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = len(probs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def rows(seed):
    g = torch.Generator().manual_seed(seed)
    # all tokens likely enough for the chi-square's expected counts (>= ~5% each)
    return torch.softmax(torch.randn(K + 1, V, generator=g), -1) * 0.7 + 0.3 / V


def run_trials(p, q, deterministic: list[int] | None = None, seed=0):
    """Emitted tokens of TRIALS verifications: drafts drawn from q (or fixed drafts, q = one-hot)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(V, dtype=torch.long)
    second = torch.zeros(V, dtype=torch.long)  # the token after an accepted first draft
    for _ in range(TRIALS):
        if deterministic is None:
            draft = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(K)]
        else:
            draft = deterministic
        out = speculative_sample(p, draft, None if deterministic else q, g)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    return first, second


@pytest.mark.parametrize("deterministic", [None, [1, 3]], ids=["draft-distribution", "one-hot"])
def test_speculative_sampling_follows_the_target(deterministic):
    p, q = rows(1), rows(2)[:K]
    first, second = run_trials(p, q, deterministic)
    assert chi_square_pvalue(first, p[0]) > 1e-3
    assert second.sum() > 1000 and chi_square_pvalue(second, p[1]) > 1e-3


def test_a_wrong_rule_is_caught(monkeypatch):
    """Negative control: resampling from p (not norm(max(0, p - q))) after a rejection biases the
    output towards q's favourites; the same test must reject it."""
    p, q = rows(1), rows(2)[:K]
    monkeypatch.setattr(verify, "_residual", lambda p_row, q_row: p_row)
    first, _ = run_trials(p, q)
    assert chi_square_pvalue(first, p[0]) < 1e-6


def test_residual_is_exact():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    torch.testing.assert_close(verify._residual(p, q), torch.tensor([1.0, 0.0, 0.0]))


def test_ngram_lookup():
    seq = [1, 2, 3, 4, 5, 9, 2, 3]
    assert ngram_lookup(seq, 2, 1, 3) == [4, 5, 9]        # "2 3" seen before: what followed
    assert ngram_lookup(seq + [7], 2, 1, 3) == []          # 7 never seen before
    assert ngram_lookup([1, 2, 1, 3, 1], 3, 1, 2) == [3, 1]  # most recent match of "1" wins
    assert ngram_lookup(seq, 2, 1, 0) == []
