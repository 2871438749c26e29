"""benchmark/figure2_gumbel.py: the Figure 2 demo draws its PNG and its regression fits the extremes for small β."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, scripts_defining

SCRIPTS = scripts_defining("gumbel_loss")


def load_demo():
    if "figure2_gumbel" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "figure2_gumbel", ROOT / "benchmark" / "figure2_gumbel.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["figure2_gumbel"] = module
        spec.loader.exec_module(module)
    return sys.modules["figure2_gumbel"]


@pytest.mark.skipif(not SCRIPTS, reason="no repository script defines gumbel_loss yet")
def test_figure2_png_and_extremes_property(tmp_path, capsys):
    demo = load_demo()
    out = tmp_path / "figure2.png"
    result = demo.main(
        [
            "--out",
            str(out),
            "--steps",
            "400",
            "--points",
            "300",
            "--regression-betas",
            "0.05",
            "1",
            "5",
        ]
    )
    assert result["script"].stem in SCRIPTS and result["script"].parent == ROOT
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000

    x, y, fits = result["x"], result["y"], result["fits"]
    grid = np.linspace(-1, 1, 201)
    small, large, mse = (demo.evaluate_curve(fits[key], grid) for key in (0.05, 5.0, "mse"))
    # each fit is the exact minimiser over the polynomials: the gradient of sum(e^z - z - 1) with respect
    # to the coefficients, sum_i (e^{z_i} - 1) phi(x_i), vanishes (scaled by e^{-max z} against overflow)
    features = demo.legendre_features(torch.as_tensor(x), 5).numpy()
    for beta in (0.05, 1.0, 5.0):
        z = (y - demo.evaluate_curve(fits[beta], x)) / beta
        weights = np.exp(z - z.max())
        assert np.abs(features.T @ (weights - np.exp(-z.max()))).max() < 1e-6 * weights.sum()
    # small β fits the upper extremes: above the large-β curve on (almost) every x, and above most data
    assert np.mean(small > large) >= 0.95
    assert np.mean(y > demo.evaluate_curve(fits[0.05], x)) < 0.15
    assert 0.35 < np.mean(y > demo.evaluate_curve(fits["mse"], x)) < 0.65
    # large β approaches the mean: close to least squares (the soft-max bias is about noise² / 2β = 0.016)
    assert np.mean(np.abs(large - mse)) < 0.05
    # the fitted curves are ordered by β (Lemma 3.1: β·log E e^{y/β} decreases as β grows)
    middle = demo.evaluate_curve(fits[1.0], grid)
    assert np.mean((small > middle) & (middle > large)) >= 0.9
    assert "figure written to" in capsys.readouterr().out


@pytest.mark.skipif(not SCRIPTS, reason="no repository script defines gumbel_loss yet")
def test_center_panel_is_the_plain_loss():
    demo = load_demo()
    gumbel_loss, _ = demo.load_gumbel_loss(SCRIPTS[0])
    difference = np.linspace(-3, 3, 13)
    for beta in (0.5, 2.0):
        z = difference / beta
        np.testing.assert_allclose(
            demo.plain_loss_from_script(gumbel_loss, difference, beta),
            np.exp(z) - z - 1,
            rtol=1e-9,
            atol=1e-12,
        )


def test_missing_script_is_a_clear_error(tmp_path):
    demo = load_demo()
    with pytest.raises(
        SystemExit, match="none of xql_offline.py, xsac_continuous.py, xtd3_continuous.py exists"
    ):
        demo.load_gumbel_loss(None, root=tmp_path)
    with pytest.raises(SystemExit, match="--script nope: .* does not exist"):
        demo.load_gumbel_loss("nope", root=tmp_path)
    (tmp_path / "other.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="defines no gumbel_loss"):
        demo.load_gumbel_loss(str(tmp_path / "other.py"))
    assert math.isinf(demo.parse_args([]).loss_clip)
