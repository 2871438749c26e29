"""Shared checks of the Gumbel loss (Eq. 7 / 11, App. D.3), run against every script defining `gumbel_loss`.

A script joins these checks automatically by defining a module-level `gumbel_loss(pred, target, beta, clip)`.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import load_script, scripts_defining

SCRIPTS = scripts_defining("gumbel_loss")
NO_CLIP = math.inf


def test_every_algorithm_script_defines_gumbel_loss(root):
    for name in ("xql_offline", "xsac_continuous", "xtd3_continuous"):
        if (root / f"{name}.py").exists():
            assert name in SCRIPTS, f"{name}.py must define a module-level gumbel_loss"


@pytest.fixture(params=SCRIPTS)
def gumbel_loss(request):
    return load_script(request.param).gumbel_loss


def log_mean_exp_reference(x: np.ndarray, beta: float) -> float:
    """beta * log mean exp(x / beta), computed with a shifted log-sum-exp in float64."""
    z = x / beta
    return float(beta * (z.max() + np.log(np.mean(np.exp(z - z.max())))))


def argmin_constant(loss_fn, x: torch.Tensor, beta: float, clip: float, iters: int = 200) -> float:
    """Minimise loss_fn(h, x) over a constant h by bisection on the sign of its gradient.

    The Gumbel loss is convex in h, so the derivative is monotone and bisection converges to the
    unique minimiser; the tolerance of the bracket after `iters` halvings is far below 1e-9.
    """
    lo, hi = float(x.min()) - 1.0, float(x.max()) + 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        h = torch.full_like(x, mid, requires_grad=True)
        loss_fn(h, x, beta, clip).backward()
        if h.grad.sum() > 0:  # loss increases with h: the minimiser lies below
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def plain_gumbel_loss(pred, target, beta, clip):
    """Eq. 7 as written, without the max-normalisation of App. D.3 (same upper clip)."""
    z = torch.clamp((target - pred) / beta, max=clip)
    return (torch.exp(z) - z - 1).mean()


BETAS = [0.1, 0.3, 1.0, 3.0, 10.0, 100.0]


@pytest.mark.parametrize("beta", BETAS)
def test_minimiser_is_log_mean_exp(gumbel_loss, beta):
    """Lemma 3.2: the minimiser over a constant is beta * log mean exp(x / beta) (tolerance 1e-6 abs)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.0, 1.0, 400), rng.gumbel(1.0, 0.5, 100)])
    h = argmin_constant(gumbel_loss, torch.tensor(x, dtype=torch.float64), beta, NO_CLIP)
    assert h == pytest.approx(log_mean_exp_reference(x, beta), abs=1e-6)


@pytest.mark.parametrize("beta", [0.5, 2.0, 10.0])
def test_gradient_descent_reaches_log_mean_exp(gumbel_loss, beta):
    """Used as in training (Adam on a parameter, clip 7) it still lands on the soft maximum (tol 1e-2)."""
    torch.manual_seed(0)
    x = torch.randn(256, dtype=torch.float64) * 2.0
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([h], lr=0.05)
    for step in range(3000):
        opt.zero_grad()
        gumbel_loss(h.expand_as(x), x, beta, 7.0).backward()
        opt.step()
        if step == 2000:
            for g in opt.param_groups:
                g["lr"] = 0.005
    assert h.item() == pytest.approx(log_mean_exp_reference(x.numpy(), beta), abs=1e-2)


def test_lemma_3_1_interpolates_max_to_mean(gumbel_loss):
    """Lemma 3.1: the minimiser falls monotonically with beta, from the sample max to the sample mean."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, 200)
    xt = torch.tensor(x, dtype=torch.float64)
    betas = np.logspace(-2, 3, 11)
    minimisers = [argmin_constant(gumbel_loss, xt, float(b), NO_CLIP) for b in betas]
    assert all(a > b for a, b in zip(minimisers, minimisers[1:])), minimisers
    # beta -> 0: within beta*log(n) of the max; beta -> inf: within var/(2 beta) (+ slack) of the mean.
    assert x.max() - betas[0] * math.log(len(x)) - 1e-6 <= minimisers[0] <= x.max() + 1e-6
    assert minimisers[-1] == pytest.approx(x.mean(), abs=x.var() / (2 * betas[-1]) + 1e-4)


def test_loss_is_nonnegative_and_zero_only_at_zero(gumbel_loss):
    """Footnote 4: e^z - z - 1 >= 0 with equality only at z = 0; the normalised form keeps this."""
    z = torch.linspace(-20.0, 7.0, 2701, dtype=torch.float64)
    values = torch.stack([gumbel_loss(torch.zeros(1, dtype=torch.float64), zi.reshape(1), 1.0, NO_CLIP) for zi in z])
    assert torch.all(values >= 0)
    zero = torch.isclose(z, torch.zeros_like(z), atol=1e-12)
    assert zero.sum() == 1 and values[zero].item() == pytest.approx(0.0, abs=1e-15)
    assert torch.all(values[~zero] > 0)


@pytest.mark.parametrize("beta", [0.2, 1.0, 5.0])
def test_normalised_form_matches_plain_form(gumbel_loss, beta):
    """App. D.3: the max-normalised loss is the plain one times e^{-m}: same minimiser, same gradient signs."""
    rng = np.random.default_rng(2)
    target = torch.tensor(rng.normal(0.0, 1.0, 300), dtype=torch.float64)
    pred = torch.tensor(rng.normal(0.0, 1.0, 300), dtype=torch.float64, requires_grad=True)
    gumbel_loss(pred, target, beta, 7.0).backward()
    stable_grad = pred.grad.clone()
    pred.grad = None
    plain_gumbel_loss(pred, target, beta, 7.0).backward()
    plain_grad = pred.grad.clone()
    nonzero = plain_grad.abs() > 1e-12
    assert torch.equal(torch.sign(stable_grad[nonzero]), torch.sign(plain_grad[nonzero]))
    ratio = stable_grad[nonzero] / plain_grad[nonzero]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)  # one positive factor e^{-m}
    assert ratio[0] > 0
    h_stable = argmin_constant(gumbel_loss, target, beta, NO_CLIP)
    h_plain = argmin_constant(plain_gumbel_loss, target, beta, NO_CLIP)
    assert h_stable == pytest.approx(h_plain, abs=1e-8)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 100.0])
@pytest.mark.parametrize("clip", [7.0, NO_CLIP])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e6])
def test_finite_for_extreme_inputs(gumbel_loss, beta, clip, scale):
    """No inf/NaN in loss or gradient (float32) for |target - pred| up to 1e6 and beta down to 0.01."""
    torch.manual_seed(0)
    for target in (torch.randn(512) * scale, torch.full((512,), scale), torch.full((512,), -scale)):
        pred = torch.zeros(512, requires_grad=True)
        loss = gumbel_loss(pred, target, beta, clip)
        loss.backward()
        assert torch.isfinite(loss), (loss, beta, clip, scale)
        assert torch.isfinite(pred.grad).all(), (beta, clip, scale)
        assert loss >= -1e-6  # float32 cancellation in e^z - z - 1 for tiny z


def test_copies_agree_across_scripts():
    """The scripts repeat gumbel_loss on purpose (each file stands alone): the copies must agree."""
    if len(SCRIPTS) < 2:
        pytest.skip("fewer than two scripts define gumbel_loss")
    torch.manual_seed(0)
    pred, target = torch.randn(1000) * 3, torch.randn(1000) * 3
    results = {}
    for name in SCRIPTS:
        p = pred.clone().requires_grad_(True)
        loss = load_script(name).gumbel_loss(p, target, 0.7, 7.0)
        loss.backward()
        results[name] = (loss.detach(), p.grad)
    first = results[SCRIPTS[0]]
    for name, (loss, grad) in results.items():
        assert torch.equal(loss, first[0]) and torch.equal(grad, first[1]), name
