"""Shared checks of the Gumbel loss (Eq. 7 / 11, App. D.3), run against every script defining
`gumbel_loss`.

A script joins these checks automatically by defining a module-level `gumbel_loss(pred, target,
beta, clip, clip_mode)`; every check runs for both clip modes: "both" (z clamped to [-clip, clip],
the authors' online code and App. D.3) and "upper" (z <= clip only, the authors' offline JAX code).
Scripts defining `clip_fraction` join its checks the same way. The copies in the three scripts are
held to identical source by tests/test_online_shared.py, so no check here compares one copy's
results with another's.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import load_script, scripts_defining

SCRIPTS = scripts_defining("gumbel_loss")
NO_CLIP = math.inf
CLIP_MODES = ("both", "upper")


def test_every_algorithm_script_defines_gumbel_loss(root):
    for name in ("xql_offline", "xsac_continuous", "xtd3_continuous"):
        if (root / f"{name}.py").exists():
            assert name in SCRIPTS, f"{name}.py must define a module-level gumbel_loss"


@pytest.fixture(
    params=[(name, mode) for name in SCRIPTS for mode in CLIP_MODES], ids="{0[0]}-{0[1]}".format
)
def script_and_mode(request):
    return request.param


@pytest.fixture
def clip_mode(script_and_mode):
    return script_and_mode[1]


@pytest.fixture
def gumbel_loss(script_and_mode):
    """The script's gumbel_loss with its clip mode bound: called as gumbel_loss(pred, target, beta,
    clip).
    """
    name, mode = script_and_mode
    return functools.partial(load_script(name).gumbel_loss, clip_mode=mode)


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


def plain_gumbel_loss(pred, target, beta, clip, clip_mode):
    """Eq. 7 as written, without the max-normalisation of App. D.3 (same clip, same clip mode)."""
    z = (target - pred) / beta
    z = torch.clamp(z, -clip, clip) if clip_mode == "both" else torch.clamp(z, max=clip)
    return (torch.exp(z) - z - 1).mean()


BETAS = [0.1, 0.3, 1.0, 3.0, 10.0, 100.0]


@pytest.mark.parametrize("beta", BETAS)
def test_minimiser_is_log_mean_exp(gumbel_loss, beta):
    """Lemma 3.2: the minimiser over a constant is beta * log mean exp(x / beta) (tolerance 1e-6
    abs).
    """
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.0, 1.0, 400), rng.gumbel(1.0, 0.5, 100)])
    h = argmin_constant(gumbel_loss, torch.tensor(x, dtype=torch.float64), beta, NO_CLIP)
    assert h == pytest.approx(log_mean_exp_reference(x, beta), abs=1e-6)


@pytest.mark.parametrize("beta", [0.5, 2.0, 10.0])
def test_gradient_descent_reaches_log_mean_exp(gumbel_loss, clip_mode, beta):
    """Used as in training (Adam on a parameter, clip 7) it still lands on the soft maximum (tol
    1e-2).

    Exception, by design of the two-sided clip: in "both" mode at beta 0.5 about half of the samples
    have z < -7 at the optimum, their gradient is clipped away and the minimiser is no longer the
    soft maximum (it lies ~0.45 above it). There Adam must land (same tol 1e-2) on the minimiser of
    the clipped loss found by bisection, which must differ from the soft maximum by more than 0.1.
    """
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
    soft_max = log_mean_exp_reference(x.numpy(), beta)
    if (clip_mode, beta) == ("both", 0.5):
        # clipped, the loss is not convex, but its gradient changes sign once here (checked on a
        # grid when written)
        assert h.item() == pytest.approx(argmin_constant(gumbel_loss, x, beta, 7.0), abs=1e-2)
        assert h.item() > soft_max + 0.1
    else:
        assert h.item() == pytest.approx(soft_max, abs=1e-2)


def test_lemma_3_1_interpolates_max_to_mean(gumbel_loss):
    """Lemma 3.1: the minimiser falls monotonically with beta, from the sample max to the sample
    mean.
    """
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, 200)
    xt = torch.tensor(x, dtype=torch.float64)
    betas = np.logspace(-2, 3, 11)
    minimisers = [argmin_constant(gumbel_loss, xt, float(b), NO_CLIP) for b in betas]
    assert all(a > b for a, b in zip(minimisers, minimisers[1:])), minimisers
    # beta -> 0: within beta*log(n) of the max; beta -> inf: within var/(2 beta) (+ slack) of the
    # mean.
    assert x.max() - betas[0] * math.log(len(x)) - 1e-6 <= minimisers[0] <= x.max() + 1e-6
    assert minimisers[-1] == pytest.approx(x.mean(), abs=x.var() / (2 * betas[-1]) + 1e-4)


def test_loss_is_nonnegative_and_zero_only_at_zero(gumbel_loss):
    """Footnote 4: e^z - z - 1 >= 0 with equality only at z = 0; the normalised form keeps this."""
    z = torch.linspace(-20.0, 7.0, 2701, dtype=torch.float64)
    values = torch.stack(
        [gumbel_loss(torch.zeros(1, dtype=torch.float64), zi.reshape(1), 1.0, NO_CLIP) for zi in z]
    )
    assert torch.all(values >= 0)
    zero = torch.isclose(z, torch.zeros_like(z), atol=1e-12)
    assert zero.sum() == 1 and values[zero].item() == pytest.approx(0.0, abs=1e-15)
    assert torch.all(values[~zero] > 0)


@pytest.mark.parametrize("beta", [0.2, 1.0, 5.0])
def test_normalised_form_matches_plain_form(gumbel_loss, clip_mode, beta):
    """App. D.3: the max-normalised loss is the plain one times e^{-m}: same minimiser, same
    gradient signs.
    """
    rng = np.random.default_rng(2)
    target = torch.tensor(rng.normal(0.0, 1.0, 300), dtype=torch.float64)
    pred = torch.tensor(rng.normal(0.0, 1.0, 300), dtype=torch.float64, requires_grad=True)
    gumbel_loss(pred, target, beta, 7.0).backward()
    stable_grad = pred.grad.clone()
    pred.grad = None
    plain = functools.partial(plain_gumbel_loss, clip_mode=clip_mode)
    plain(pred, target, beta, 7.0).backward()
    plain_grad = pred.grad.clone()
    nonzero = plain_grad.abs() > 1e-12
    assert torch.equal(torch.sign(stable_grad[nonzero]), torch.sign(plain_grad[nonzero]))
    ratio = stable_grad[nonzero] / plain_grad[nonzero]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)  # one positive factor e^{-m}
    assert ratio[0] > 0
    h_stable = argmin_constant(gumbel_loss, target, beta, NO_CLIP)
    h_plain = argmin_constant(plain, target, beta, NO_CLIP)
    assert h_stable == pytest.approx(h_plain, abs=1e-8)


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 100.0])
@pytest.mark.parametrize("clip, mode", [(7.0, "both"), (7.0, "upper"), (NO_CLIP, "both")])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e6])
def test_finite_for_extreme_inputs(name, beta, clip, mode, scale):
    """No inf/NaN in loss or gradient (float32) for |target - pred| up to 1e6 and beta down to
    0.01. Without a clip the two modes are one computation: that case runs once."""
    gumbel_loss = functools.partial(load_script(name).gumbel_loss, clip_mode=mode)
    torch.manual_seed(0)
    for target in (torch.randn(512) * scale, torch.full((512,), scale), torch.full((512,), -scale)):
        pred = torch.zeros(512, requires_grad=True)
        loss = gumbel_loss(pred, target, beta, clip)
        loss.backward()
        assert torch.isfinite(loss), (loss, beta, clip, scale)
        assert torch.isfinite(pred.grad).all(), (beta, clip, scale)
        assert loss >= -1e-6  # float32 cancellation in e^z - z - 1 for tiny z


# ---- the two clip modes (issue 11, item 1)
# ----------------------------------------------------------------------------


def per_sample_grad(loss_fn, pred, target, *args):
    p = pred.clone().requires_grad_(True)
    loss = loss_fn(p, target, *args)
    loss.backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize("name", SCRIPTS)
def test_clip_modes_differ_only_below_minus_clip(name):
    """clip 2, beta 1. z < -clip (prediction far above its target): gradient exactly 0 with "both",
    with "upper" the unclipped e^{-m}(1 - e^z)/(n beta) > 0 (descent lowers the prediction toward
    its target). z > clip: exactly 0 in both modes. Inside [-clip, clip] (ends included) the modes
    agree bit for bit, in loss and gradient.
    """
    loss_fn = load_script(name).gumbel_loss
    clip, beta = 2.0, 1.0
    target = torch.zeros(6, dtype=torch.float64)
    pred = torch.tensor(
        [5.0, 2.5, 0.5, -1.0, -3.0, -40.0], dtype=torch.float64
    )  # z = -5, -2.5, -0.5, 1, 3, 40
    below, inside, above = slice(0, 2), slice(2, 4), slice(4, 6)
    loss_both, grad_both = per_sample_grad(loss_fn, pred, target, beta, clip, "both")
    loss_upper, grad_upper = per_sample_grad(loss_fn, pred, target, beta, clip, "upper")
    assert torch.all(grad_both[below] == 0), grad_both
    z = (target - pred)[below] / beta
    m = clip  # max of the clipped z (the samples above the clip sit at +clip), > -1
    expected = math.exp(-m) * (1 - torch.exp(z)) / (len(pred) * beta)
    assert torch.all(grad_upper[below] > 0), grad_upper
    assert torch.allclose(grad_upper[below], expected, rtol=1e-12, atol=0), (grad_upper, expected)
    assert torch.all(grad_both[above] == 0) and torch.all(grad_upper[above] == 0), (
        grad_both,
        grad_upper,
    )
    assert torch.equal(grad_both[inside], grad_upper[inside])
    assert torch.all(grad_both[inside] != 0)
    assert (
        loss_upper > loss_both
    )  # e^z - z - 1 grows as z falls past -clip: the upper mode keeps it

    # every z inside the closed interval: the two modes are the same function
    pred = torch.linspace(
        -clip, clip, 41, dtype=torch.float64
    )  # z from +2 to -2, both ends included
    target = torch.zeros_like(pred)
    loss_both, grad_both = per_sample_grad(loss_fn, pred, target, beta, clip, "both")
    loss_upper, grad_upper = per_sample_grad(loss_fn, pred, target, beta, clip, "upper")
    assert torch.equal(loss_both, loss_upper) and torch.equal(grad_both, grad_upper)
    assert torch.count_nonzero(grad_both) == len(pred) - 1  # only z = 0 has a zero gradient


CLIP_FRACTION_SCRIPTS = scripts_defining("clip_fraction")


def test_every_algorithm_script_defines_clip_fraction(root):
    for name in ("xql_offline", "xsac_continuous", "xtd3_continuous"):
        if (root / f"{name}.py").exists():
            assert name in CLIP_FRACTION_SCRIPTS, (
                f"{name}.py must define a module-level clip_fraction"
            )


# ---- clip_fraction: the share of z beyond the clip (issue 11, item 11)
# -------------------------------------------------


@pytest.mark.parametrize("name", CLIP_FRACTION_SCRIPTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_fraction_hand_made(name, dtype):
    """beta 2, clip 1.5, z = -5, -1.6, -1.5, 0, 1, 1.5, 1.6, 50: z exactly at +-clip is not beyond
    it (its gradient still flows). "upper" counts z > 1.5 (2 of 8), "both" also z < -1.5 (4 of 8).
    """
    clip_fraction = load_script(name).clip_fraction
    diff = torch.tensor(
        [-10.0, -3.2, -3.0, 0.0, 2.0, 3.0, 3.2, 100.0], dtype=dtype
    )  # target - pred
    pred = torch.full_like(diff, 0.25, requires_grad=True)
    target = pred.detach() + diff
    assert ((target - pred.detach()) / 2.0).tolist() == pytest.approx(
        [-5, -1.6, -1.5, 0, 1, 1.5, 1.6, 50], abs=1e-6
    )
    assert clip_fraction(pred, target, 2.0, 1.5, "upper").item() == 0.25
    assert clip_fraction(pred, target, 2.0, 1.5, "both").item() == 0.5
    assert clip_fraction(pred, target, 2.0, math.inf, "both").item() == 0.0
    assert clip_fraction(pred, target, 2.0, 0.5, "both").item() == 7 / 8  # all but z = 0
    assert clip_fraction(pred, target, 2.0, 0.5, "upper").item() == 4 / 8  # z = 1, 1.5, 1.6, 50


@pytest.mark.parametrize("name", sorted(set(CLIP_FRACTION_SCRIPTS) & set(SCRIPTS)))
@pytest.mark.parametrize("clip_mode", CLIP_MODES)
def test_clip_fraction_counts_the_samples_gumbel_loss_clips(name, clip_mode):
    """On random data (no z = 0), clip_fraction is exactly the share of samples whose gumbel_loss
    gradient is zero.
    """
    module = load_script(name)
    torch.manual_seed(1)
    pred, target = torch.randn(4000) * 3, torch.randn(4000) * 3
    _, grad = per_sample_grad(module.gumbel_loss, pred, target, 0.5, 7.0, clip_mode)
    fraction = module.clip_fraction(pred, target, 0.5, 7.0, clip_mode)
    assert 0.05 < fraction.item() < 0.5  # the example does exercise the clip
    clipped = int((grad == 0).sum())
    assert abs(fraction.item() * len(pred) - clipped) < 1e-2, (
        fraction,
        clipped,
    )  # the same count, exactly
