"""Figure 2 of the paper: the Gumbel distribution, the Gumbel loss, and Gumbel regression, for several β.

Left: the Gumbel pdf p(x) = (1/β) exp(-(z + e^{-z})), z = x/β (location μ = 0, Sec. 2).
Center: the Gumbel loss e^z − z − 1 against target − prediction, z = (target − prediction)/β (Eq. 7),
with the squared error ½(target − prediction)² for reference.
Right: Gumbel regression on a two-dimensional dataset (x uniform on [−1, 1], y = sin(πx) + Gaussian
noise): a curve f(x) fitted by minimising the Gumbel loss over the dataset for each β, beside the
least-squares fit. The minimiser at each x is β·log E[e^{y/β} | x] (Lemma 3.2): small β hugs the
upper extremes of the data, large β approaches the mean (Lemma 3.1).

The loss is the repository's own `gumbel_loss`, loaded from one of the algorithm scripts (the first
of xql_offline.py, xsac_continuous.py, xtd3_continuous.py that exists, or `--script`). The center
panel evaluates it on one (prediction, target) pair at a time and multiplies by e^{max(z, −1)}, which
undoes the per-batch normalisation of App. D.3 and gives back e^z − z − 1 exactly.

f is a degree-`--degree` polynomial in x (Legendre basis) fitted with full-batch Adam: the loss is
convex in f's coefficients, so every β has one minimiser and the picture does not depend on the
optimiser's luck. The regression uses no clip (`--loss-clip inf`): the clip is a safeguard against
outliers in RL targets, and here it would silence the very points small β must fit.

Usage:
    python benchmark/figure2_gumbel.py --out figure2.png
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

PROG = "figure2_gumbel"
ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("xql_offline", "xsac_continuous", "xtd3_continuous")


def load_gumbel_loss(script: str | None = None, root: Path = ROOT):
    """(gumbel_loss, path) from a repository script: `script` is a stem in root or a path to a .py file."""
    if script is None:
        candidates = [root / f"{stem}.py" for stem in SCRIPTS if (root / f"{stem}.py").is_file()]
        if not candidates:
            raise SystemExit(
                f"{PROG}: none of {', '.join(s + '.py' for s in SCRIPTS)} exists in {root}; "
                "run this from a checkout of the repository, or pass --script PATH to a file defining gumbel_loss"
            )
        path = candidates[0]
    else:
        path = Path(script) if script.endswith(".py") else root / f"{script}.py"
        if not path.is_file():
            raise SystemExit(
                f"{PROG}: --script {script}: {path} does not exist (use one of {', '.join(SCRIPTS)} or a path to a .py file)"
            )
    name = f"_figure2_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = (
        module  # dataclasses look their module up while the script is being imported
    )
    spec.loader.exec_module(module)
    if not callable(getattr(module, "gumbel_loss", None)):
        raise SystemExit(
            f"{PROG}: {path} defines no gumbel_loss(pred, target, beta, clip, clip_mode)"
        )
    return module.gumbel_loss, path


def gumbel_pdf(x: np.ndarray, beta: float, loc: float = 0.0) -> np.ndarray:
    z = (x - loc) / beta
    return np.exp(-(z + np.exp(-z))) / beta


def plain_loss_from_script(gumbel_loss, difference: np.ndarray, beta: float) -> np.ndarray:
    """e^z − z − 1 at z = difference/β, computed with the script's loss one pair at a time."""
    values = []
    for d in difference:
        pred, target = torch.zeros(1, dtype=torch.float64), torch.tensor([d], dtype=torch.float64)
        normalised = gumbel_loss(pred, target, beta, math.inf, "upper").item()  # unclipped
        values.append(
            normalised * math.exp(max(d / beta, -1.0))
        )  # undo App. D.3's factor e^{-max(z, -1)}
    return np.array(values)


def make_dataset(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, n)
    return x, np.sin(np.pi * x) + rng.normal(0.0, noise, n)


def legendre_features(x: torch.Tensor, degree: int) -> torch.Tensor:
    features = [torch.ones_like(x), x]
    for k in range(1, degree):  # Bonnet's recursion: well conditioned on [-1, 1], unlike raw powers
        features.append(((2 * k + 1) * x * features[k] - k * features[k - 1]) / (k + 1))
    return torch.stack(features[: degree + 1], dim=1)


def fit_curve(
    x: np.ndarray, y: np.ndarray, loss_fn, degree: int, steps: int, lr: float
) -> np.ndarray:
    """Polynomial coefficients minimising loss_fn(pred, target) over the dataset (full-batch Adam)."""
    features = legendre_features(torch.as_tensor(x, dtype=torch.float64), degree)
    target = torch.as_tensor(y, dtype=torch.float64)
    coefficients = torch.zeros(degree + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([coefficients], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, steps
    )  # settle on the minimiser
    for _ in range(steps):
        optimiser.zero_grad()
        loss_fn(features @ coefficients, target).backward()
        optimiser.step()
        schedule.step()
    return coefficients.detach().numpy()


def evaluate_curve(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    features = legendre_features(torch.as_tensor(x, dtype=torch.float64), len(coefficients) - 1)
    return (features @ torch.as_tensor(coefficients)).numpy()


def gumbel_regression(
    x, y, gumbel_loss, betas, clip: float, degree: int, steps: int, lr: float
) -> dict:
    """β -> fitted coefficients, plus "mse" -> the least-squares fit."""
    fits = {
        beta: fit_curve(
            x, y, lambda p, t, b=beta: gumbel_loss(p, t, b, clip, "upper"), degree, steps, lr
        )
        for beta in betas
    }
    fits["mse"] = fit_curve(x, y, lambda p, t: ((p - t) ** 2).mean(), degree, steps, lr)
    return fits


def draw(path: Path, gumbel_loss, script_name: str, args: argparse.Namespace, x, y, fits) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, center, right) = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    colors = plt.get_cmap("viridis")

    grid = np.linspace(-4, 10, 600)
    for i, beta in enumerate(args.betas):
        left.plot(
            grid,
            gumbel_pdf(grid, beta),
            color=colors(0.85 * i / max(1, len(args.betas) - 1)),
            lw=2,
            label=f"β = {beta:g}",
        )
    left.set(title="Gumbel pdf, μ = 0", xlabel="x", ylabel="p(x)")
    left.legend(frameon=False)

    difference = np.linspace(-3, 3, 241)
    for i, beta in enumerate(args.betas):
        center.plot(
            difference,
            plain_loss_from_script(gumbel_loss, difference, beta),
            color=colors(0.85 * i / max(1, len(args.betas) - 1)),
            lw=2,
            label=f"β = {beta:g}",
        )
    center.plot(
        difference, 0.5 * difference**2, color="0.3", ls="--", lw=1.5, label="½(target − pred)²"
    )
    center.set(
        title=f"Gumbel loss e^z − z − 1, z = (target − pred)/β\n(computed with {script_name}'s gumbel_loss)",
        xlabel="target − prediction",
        ylabel="loss",
        ylim=(0, 5),
    )
    center.legend(frameon=False, loc="upper center")

    right.scatter(x, y, s=6, color="0.6", alpha=0.6, label="data")
    curve_x = np.linspace(-1, 1, 300)
    for i, beta in enumerate(args.regression_betas):
        right.plot(
            curve_x,
            evaluate_curve(fits[beta], curve_x),
            color=plt.get_cmap("plasma")(0.85 * i / max(1, len(args.regression_betas) - 1)),
            lw=2,
            label=f"β = {beta:g}",
        )
    right.plot(
        curve_x,
        evaluate_curve(fits["mse"], curve_x),
        color="k",
        ls="--",
        lw=1.5,
        label="least squares (mean)",
    )
    right.set(
        title="Gumbel regression: small β fits the upper extremes,\nlarge β the mean",
        xlabel="x",
        ylabel="y",
    )
    right.legend(frameon=False, fontsize=8, loc="lower right")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(
        f".{path.name}.{os.getpid()}.tmp"
    )  # written whole, then renamed: never half a PNG
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--script",
        help=f"where gumbel_loss comes from: one of {', '.join(SCRIPTS)} or a path to a .py file (default: the first that exists)",
    )
    parser.add_argument("--out", type=Path, default=Path("figure2.png"), help="PNG to write")
    parser.add_argument(
        "--betas",
        nargs="+",
        type=float,
        default=[0.5, 1.0, 2.0, 5.0],
        help="β of the pdf and loss panels",
    )
    parser.add_argument(
        "--regression-betas",
        nargs="+",
        type=float,
        default=[0.05, 0.2, 1.0, 5.0],
        help="β of the regression panel",
    )
    parser.add_argument(
        "--loss-clip",
        type=float,
        default=math.inf,
        help="clip passed to gumbel_loss in the regression (default: none)",
    )
    parser.add_argument("--points", type=int, default=400, help="size of the regression dataset")
    parser.add_argument("--noise", type=float, default=0.4, help="std of the Gaussian noise on y")
    parser.add_argument("--degree", type=int, default=5, help="degree of the fitted polynomial")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per fit")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset")
    args = parser.parse_args(argv)
    if min(args.betas + args.regression_betas) <= 0:
        parser.exit(2, f"{PROG}: every β must be positive\n")
    if args.out.suffix.lower() != ".png":
        parser.exit(
            2, f"{PROG}: --out writes a PNG; give a file name ending in .png, got {args.out}\n"
        )
    if args.points < args.degree + 1:
        parser.exit(2, f"{PROG}: --points must be at least --degree + 1 = {args.degree + 1}\n")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    gumbel_loss, script_path = load_gumbel_loss(args.script)
    torch.manual_seed(args.seed)
    x, y = make_dataset(args.points, args.noise, args.seed)
    fits = gumbel_regression(
        x, y, gumbel_loss, args.regression_betas, args.loss_clip, args.degree, args.steps, args.lr
    )
    draw(args.out, gumbel_loss, script_path.name, args, x, y, fits)
    print(f"{PROG}: gumbel_loss from {script_path}; figure written to {args.out}")
    return {"x": x, "y": y, "fits": fits, "script": script_path}


if __name__ == "__main__":
    main()
