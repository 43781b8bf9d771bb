"""Divergences against formulas written out independently here, in float64, term by term."""

from __future__ import annotations

import math

import pytest
import torch

from distillens import losses

V = 13


def probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = logits.double() / temperature
    e = (z - z.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_v p log(p / q), with 0 log 0 = 0."""
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    return terms.sum(-1)


def reference(name: str, s: torch.Tensor, t: torch.Tensor, **params) -> torch.Tensor:
    """Per-token divergence from the definitions in docs/method.md's divergence table, written independently of losses.py."""
    temperature = params.pop("temperature", 1.0)
    ps, pt = probs(s, temperature), probs(t, temperature)
    if name == "forward_kl":
        return kl(pt, ps)
    if name == "reverse_kl":
        return kl(ps, pt)
    if name == "jeffreys":
        return kl(pt, ps) + kl(ps, pt)
    if name == "jsd":
        beta = params.get("beta", 0.5)
        m = beta * pt + (1 - beta) * ps
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    if name == "skew_forward_kl":
        a = params.get("alpha", 0.1)
        return kl(pt, a * pt + (1 - a) * ps)
    if name == "skew_reverse_kl":
        a = params.get("alpha", 0.1)
        return kl(ps, a * ps + (1 - a) * pt)
    if name == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    if name == "akl":
        return reference_akl(ps, pt, params.get("mu", 0.5))
    raise AssertionError(name)


def reference_akl(ps: torch.Tensor, pt: torch.Tensor, mu: float) -> torch.Tensor:
    """AKL row by row with a Python loop over the teacher's sorted vocabulary."""
    out, vocab = [], ps.shape[-1]
    for p_s, p_t in zip(ps.reshape(-1, vocab), pt.reshape(-1, vocab), strict=True):
        order = sorted(range(vocab), key=lambda v: -float(p_t[v]))
        head, mass = set(), 0.0
        for v in order:
            if mass >= mu:
                break
            head.add(v)
            mass += float(p_t[v])
        gap_head = sum(abs(float(p_t[v] - p_s[v])) for v in head)
        gap_all = sum(abs(float(p_t[v] - p_s[v])) for v in range(vocab))
        g = gap_head / gap_all
        out.append(g * kl(p_t, p_s) + (1 - g) * kl(p_s, p_t))
    return torch.stack(out).reshape(ps.shape[:-1])


NAMES = sorted(losses.REGISTRY)
PARAMS = {
    "jsd": [{}, {"beta": 0.3}, {"beta": 0.9, "temperature": 2.0}],
    "skew_forward_kl": [{}, {"alpha": 0.5}],
    "skew_reverse_kl": [{}, {"alpha": 0.5}],
    "akl": [{}, {"mu": 0.8}],
    "forward_kl": [{}, {"temperature": 0.5}],
}
CASES = [(name, p) for name in NAMES for p in PARAMS.get(name, [{}])]


def test_registry_has_every_documented_name():
    assert set(NAMES) == {
        "forward_kl", "reverse_kl", "jeffreys", "jsd", "skew_forward_kl", "skew_reverse_kl", "akl", "tvd",
    }  # fmt: skip


@pytest.mark.parametrize(("name", "params"), CASES)
def test_divergence_matches_direct_formula(name, params):
    s, t = torch.randn(4, 5, V) * 2, torch.randn(4, 5, V) * 2
    mask = torch.rand(4, 5) > 0.3
    expected = reference(name, s, t, **params)[mask].mean()
    got = losses.get_divergence(name)(s, t, mask, **params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_zero_on_identical_inputs(name):
    s = torch.randn(3, 7, V)
    assert losses.get_divergence(name)(s, s.clone()).abs() < 1e-6


@pytest.mark.parametrize("name", ["jsd", "jeffreys", "tvd"])
def test_symmetric_divergences(name):
    s, t = torch.randn(6, V), torch.randn(6, V)
    fn = losses.get_divergence(name)
    torch.testing.assert_close(fn(s, t), fn(t, s))


def test_kl_directions_are_not_symmetric():
    s, t = torch.randn(6, V) * 3, torch.randn(6, V)
    assert not torch.allclose(losses.forward_kl(s, t), losses.reverse_kl(s, t))
    torch.testing.assert_close(losses.forward_kl(s, t), losses.reverse_kl(t, s))


def test_jsd_is_bounded_by_log2_and_its_beta_ends_are_documented():
    s, t = torch.randn(50, V) * 20, torch.randn(50, V) * 20
    assert losses.jsd(s, t) <= math.log(2) + 1e-6
    assert losses.jsd(s, t, beta=0.0) == 0 and losses.jsd(s, t, beta=1.0) == 0
    s, t = torch.randn(50, V), torch.randn(50, V)
    small = 1e-4  # jsd / beta -> KL(T||S) and jsd / (1 - beta) -> KL(S||T) at the two ends
    torch.testing.assert_close(
        losses.jsd(s, t, beta=small) / small, losses.forward_kl(s, t), rtol=2e-2, atol=1e-3
    )
    torch.testing.assert_close(
        losses.jsd(s, t, beta=1 - small) / small, losses.reverse_kl(s, t), rtol=2e-2, atol=1e-3
    )


def test_skew_kl_with_alpha_zero_is_plain_kl():
    s, t = torch.randn(5, V), torch.randn(5, V)
    torch.testing.assert_close(losses.skew_forward_kl(s, t, alpha=0.0), losses.forward_kl(s, t))
    torch.testing.assert_close(losses.skew_reverse_kl(s, t, alpha=0.0), losses.reverse_kl(s, t))


@pytest.mark.parametrize("name", NAMES)
def test_mask_per_row_with_batch_above_one(name):
    """Each row has its own mask: the result is the mean over exactly the counted (row, position) tokens.

    The published code repeats the mask in the wrong order for batch > 1; here each token is checked individually.
    """
    s, t = torch.randn(3, 6, V), torch.randn(3, 6, V)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    fn = losses.get_divergence(name)
    tokens = [fn(s[b, i], t[b, i]) for b in range(3) for i in range(6) if mask[b, i]]
    torch.testing.assert_close(fn(s, t, mask), torch.stack(tokens).mean())
    flipped = fn(s, t, mask.flip(0))
    assert not torch.allclose(flipped, fn(s, t, mask))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_are_computed_in_fp32(name):
    s, t = torch.randn(4, 8, V), torch.randn(4, 8, V)
    fn = losses.get_divergence(name)
    got = fn(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    # the float64 value of the bf16-rounded inputs, from the definition: bf16 arithmetic would be ~1e-2 off
    expected = reference(name, s.bfloat16().double(), t.bfloat16().double()).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_minus_inf_entries_shared_by_both_models_drop_out(name):
    """A vocabulary slice masked to -inf in both models contributes nothing: same value as without those columns."""
    s, t = torch.randn(4, V), torch.randn(4, V)
    s[:, :3] = float("-inf")
    t[:, :3] = float("-inf")
    s = s.requires_grad_()
    value = losses.get_divergence(name)(s, t)
    value.backward()
    torch.testing.assert_close(value.double(), reference(name, s.detach()[:, 3:], t[:, 3:]).mean())
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_minus_inf_in_one_model_only_gives_no_nan(name):
    """Disjoint support makes some divergences infinite in theory; the result and gradients are never NaN."""
    s, t = torch.randn(4, V), torch.randn(4, V)
    t[0, 5] = float("-inf")  # the teacher alone excludes a token the student likes
    s[1, 7] = float("-inf")  # and the student alone excludes one
    s = s.requires_grad_()
    value = losses.get_divergence(name)(s, t)
    value.backward()
    assert not torch.isnan(value)
    assert not torch.isnan(s.grad).any()


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_gives_zero_with_gradient_path(name):
    s = torch.randn(2, 4, V, requires_grad=True)
    value = losses.get_divergence(name)(s, torch.randn(2, 4, V), torch.zeros(2, 4, dtype=torch.bool))
    assert value == 0
    value.backward()
    assert s.grad is not None and (s.grad == 0).all()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown divergence 'kll'.*forward_kl.*jsd"):
        losses.get_divergence("kll")


def test_bad_parameters_are_rejected():
    s = torch.randn(2, V)
    with pytest.raises(ValueError, match="beta"):
        losses.jsd(s, s, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        losses.forward_kl(s, s, temperature=0)
    with pytest.raises(ValueError, match="shape"):
        losses.forward_kl(s, torch.randn(2, V + 1))


def test_masked_mse_ignores_masked_tokens():
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 0, 0, 0, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    expected = torch.stack(
        [((s[b, i] - t[b, i]) ** 2).mean() for b in range(2) for i in range(5) if mask[b, i]]
    )
    torch.testing.assert_close(losses.masked_mse(s, t, mask), expected.mean())
    t_changed = t.clone()
    t_changed[~mask] += 100.0  # padding and prompt tokens must not move the loss
    torch.testing.assert_close(losses.masked_mse(s, t_changed, mask), expected.mean())


GRADIENT_CASES = [
    ("forward_kl", {}),
    ("forward_kl", {"temperature": 2.0}),
    ("reverse_kl", {}),
    ("reverse_kl", {"temperature": 0.7}),
    ("jsd", {}),
    ("jsd", {"beta": 0.2, "temperature": 1.5}),
    ("jsd", {"beta": 1.0}),
]


def test_every_closed_form_gradient_is_tested():
    assert {name for name, _ in GRADIENT_CASES} == set(losses.closed_forms())


@pytest.mark.parametrize("with_inf", [False, True])
@pytest.mark.parametrize(("name", "params"), GRADIENT_CASES)
def test_closed_form_gradient_equals_autograd(name, params, with_inf):
    s, t = torch.randn(6, V) * 3, torch.randn(6, V) * 3
    if with_inf:
        s[:, :2] = t[:, :2] = float("-inf")
    leaf = s.clone().requires_grad_()
    expected_values = losses.REGISTRY[name].value(leaf, t, **params)
    (expected_grad,) = torch.autograd.grad(expected_values.sum(), leaf)
    values, grad = losses.REGISTRY[name].gradient(s, t, **params)
    torch.testing.assert_close(values, expected_values.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
