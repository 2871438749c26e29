"""Are Bellman errors Gumbel? Fit a Gumbel and a Gaussian to logged errors (Figure 1, App. D.2).

The online scripts, run with `--log-bellman-errors`, save every `--bellman-log-freq` env steps the
errors r + γ·Q₁(s′, π(s′)) − Q₁(s, a) of one replay batch (first critic, no target network, no
entropy term, the policy's mean action; App. D.2) as a 1-D float32 array in
`runs/{run_name}/bellman_errors/step_{global_step:08d}.npy`. This tool reads such run folders (or
the .npy files themselves), fits by maximum likelihood (scipy, as the paper did)

- a Gumbel: both orientations, `gumbel_r` (long right tail) and `gumbel_l` (long left tail), and
  keeps the one with the higher likelihood. Which one to expect is not settled by the text: Sec. 3.1
  only says the errors are "skewed", Sec. 3.2 models targets as x = h + ε with ε ~ −G(0, β), and the
  sign of the error depends on whether it is written target − prediction (App. D.2, this tool) or
  the reverse. So both are fitted and the table says which won;
- a Gaussian (sample mean and the ddof=0 std, its MLE),

prints one line per saved step (n, Gumbel loc/scale and mean log-likelihood, Gaussian mean/std and
mean log-likelihood), and plots each step's histogram (density) with both fitted pdfs, their mean
log-likelihoods in the legend (nats per sample; higher is the better fit).

Clipping: the paper clipped the errors "to the ranges shown" before fitting, against outliers.
`--clip LO HI` does this; by default values outside are dropped (`--clip-mode drop`), because
clamping them (`--clip-mode clamp`, np.clip) piles point masses on the bounds that no continuous
density can fit.

Usage:
    python benchmark/bellman_errors.py runs/dm_control-cheetah-run-v0__xsac__1__1700000000 --clip -5 5 --out bellman.png
    python benchmark/bellman_errors.py runs/RUN --pool        # one panel, all steps together
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

PROG = "bellman_errors"
STEP_FILE = re.compile(r"step_(\d+)\.npy")


@dataclass
class Sample:
    label: str  # run folder name, or the file's folder for loose files
    step: int | None
    errors: np.ndarray


@dataclass
class Fit:
    n: int
    gumbel_side: str  # "r": long right tail (scipy gumbel_r); "l": long left tail (gumbel_l)
    gumbel_loc: float
    gumbel_scale: float
    gumbel_ll: float  # mean log-likelihood per sample, the better orientation
    other_side_ll: float  # the same for the other orientation
    gaussian_mean: float
    gaussian_std: float
    gaussian_ll: float

    @property
    def winner(self) -> str:
        return "Gumbel" if self.gumbel_ll > self.gaussian_ll else "Gaussian"

    def gumbel(self):
        family = stats.gumbel_r if self.gumbel_side == "r" else stats.gumbel_l
        return family(loc=self.gumbel_loc, scale=self.gumbel_scale)


def fit_errors(errors: np.ndarray) -> Fit:
    """Maximum-likelihood Gumbel (both orientations, the better kept) and Gaussian fits."""
    errors = np.asarray(errors, dtype=np.float64)
    fits = {}
    for side, family in (("r", stats.gumbel_r), ("l", stats.gumbel_l)):
        loc, scale = family.fit(errors)
        fits[side] = (loc, scale, float(family.logpdf(errors, loc, scale).mean()))
    side = max(fits, key=lambda s: fits[s][2])
    mean, std = stats.norm.fit(errors)
    return Fit(
        n=len(errors),
        gumbel_side=side,
        gumbel_loc=float(fits[side][0]),
        gumbel_scale=float(fits[side][1]),
        gumbel_ll=fits[side][2],
        other_side_ll=fits["l" if side == "r" else "r"][2],
        gaussian_mean=float(mean),
        gaussian_std=float(std),
        gaussian_ll=float(stats.norm.logpdf(errors, mean, std).mean()),
    )


def npy_files(path: Path) -> list[Path]:
    """The step files a command-line path stands for: a .npy file, a run folder, or its bellman_errors/."""
    if path.is_file():
        if path.suffix != ".npy":
            raise SystemExit(
                f"{PROG}: {path} is not a .npy file (pass run folders or bellman_errors/step_*.npy files)"
            )
        return [path]
    if not path.is_dir():
        raise SystemExit(f"{PROG}: {path} does not exist")
    folder = path / "bellman_errors" if (path / "bellman_errors").is_dir() else path
    files = sorted(p for p in folder.glob("*.npy") if STEP_FILE.fullmatch(p.name))
    if not files:
        raise SystemExit(
            f"{PROG}: no step_*.npy files in {folder} (was the run started with --log-bellman-errors, and has it reached --bellman-log-freq steps?)"
        )
    return files


def load_samples(
    paths: list[Path], clip: tuple[float, float] | None, clip_mode: str
) -> list[Sample]:
    samples = []
    for path in paths:
        for file in npy_files(path):
            try:
                errors = np.load(file, allow_pickle=False)
            except (ValueError, OSError) as error:
                raise SystemExit(f"{PROG}: cannot read {file} as a numpy array ({error})") from None
            if errors.ndim != 1 or not np.issubdtype(errors.dtype, np.floating):
                raise SystemExit(
                    f"{PROG}: {file} holds a {errors.dtype} array of shape {errors.shape}; expected a 1-D float array of Bellman errors"
                )
            errors = errors.astype(np.float64)
            finite = np.isfinite(errors)
            if not finite.all():
                print(
                    f"{PROG}: warning: {file}: dropped {int((~finite).sum())} non-finite values",
                    file=sys.stderr,
                )
                errors = errors[finite]
            if clip is not None:
                if clip_mode == "clamp":
                    errors = np.clip(errors, *clip)
                else:
                    errors = errors[(errors >= clip[0]) & (errors <= clip[1])]
            match = STEP_FILE.fullmatch(file.name)
            folder = file.parent.parent if file.parent.name == "bellman_errors" else file.parent
            samples.append(Sample(folder.name, int(match[1]) if match else None, errors))
    return samples


def pool(samples: list[Sample]) -> Sample:
    labels = sorted({s.label for s in samples})
    label = labels[0] if len(labels) == 1 else f"{len(labels)} runs"
    steps = [s.step for s in samples if s.step is not None]
    span = f"steps {min(steps):,}–{max(steps):,}, " if steps else ""
    return Sample(
        f"{label}\n{span}{len(samples)} batches pooled",
        None,
        np.concatenate([s.errors for s in samples]),
    )


def print_table(samples: list[Sample], fits: list[Fit | None]) -> None:
    width = max(len(s.label) for s in samples) + 1
    header = f"{'run':<{width}} {'step':>9} {'n':>7} | {'Gumbel':>6} {'loc':>9} {'scale':>8} {'LL':>8} | {'Gauss mean':>10} {'std':>8} {'LL':>8} | better"
    print(header)
    print("-" * len(header))
    for sample, fit in zip(samples, fits):
        step = f"{sample.step:,}" if sample.step is not None else "-"
        label = sample.label.replace("\n", ", ")
        if fit is None:
            print(
                f"{label:<{width}} {step:>9} {len(sample.errors):>7} | too few distinct values to fit"
            )
            continue
        side = "right" if fit.gumbel_side == "r" else "left"
        print(
            f"{label:<{width}} {step:>9} {fit.n:>7} | {side:>6} {fit.gumbel_loc:>9.4g} {fit.gumbel_scale:>8.4g} {fit.gumbel_ll:>8.4f} | "
            f"{fit.gaussian_mean:>10.4g} {fit.gaussian_std:>8.4g} {fit.gaussian_ll:>8.4f} | {fit.winner}"
        )
    print(
        "LL: mean log-likelihood per sample (nats), higher fits better. Gumbel 'right'/'left': the side of the long tail."
    )


def plot(
    samples: list[Sample],
    fits: list[Fit | None],
    path: Path,
    bins: int,
    clip: tuple[float, float] | None,
    clip_mode: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one_run = len({s.label for s in samples}) == 1
    ncols = min(4, len(samples))
    nrows = math.ceil(len(samples) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(4.4 * ncols, 7.5), 3.4 * nrows + 0.8),
        squeeze=False,
        layout="constrained",
    )
    for ax, sample, fit in zip(axes.flat, samples, fits):
        ax.hist(
            sample.errors,
            bins=bins,
            density=True,
            color="0.75",
            edgecolor="0.6",
            linewidth=0.3,
            label="Bellman errors",
        )
        if fit is not None:
            low, high = np.quantile(sample.errors, [0.0, 1.0])
            x = np.linspace(low, high, 400)
            side = "right" if fit.gumbel_side == "r" else "left"
            ax.plot(
                x,
                fit.gumbel().pdf(x),
                color="tab:red",
                lw=1.8,
                label=f"Gumbel ({side} tail): μ={fit.gumbel_loc:.3g}, β={fit.gumbel_scale:.3g}\nLL={fit.gumbel_ll:.3f}",
            )
            ax.plot(
                x,
                stats.norm.pdf(x, fit.gaussian_mean, fit.gaussian_std),
                color="tab:blue",
                lw=1.8,
                ls="--",
                label=f"Gaussian: μ={fit.gaussian_mean:.3g}, σ={fit.gaussian_std:.3g}\nLL={fit.gaussian_ll:.3f}",
            )
        title = sample.label if sample.step is None else f"step {sample.step:,}"
        if sample.step is not None and not one_run:
            title = f"{sample.label}\n{title}"
        ax.set_title(f"{title}  (n={len(sample.errors):,})", fontsize=9)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.55)  # headroom for the legend above the histogram
        ax.set_xlabel("Bellman error")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper left", frameon=False)
    for ax in axes.flat[len(samples) :]:
        ax.set_visible(False)
    clipped = f"; clipped to [{clip[0]:g}, {clip[1]:g}] ({clip_mode})" if clip else ""
    run = f"{samples[0].label}: " if one_run and samples[0].step is not None else ""
    fig.suptitle(
        f"{run}Bellman errors r + γ·Q₁(s′, π(s′)) − Q₁(s, a), maximum-likelihood fits{clipped}\n"
        "LL = mean log-likelihood per sample (higher fits better)",
        fontsize=10,
    )
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
        "paths",
        nargs="+",
        type=Path,
        help="run folders, their bellman_errors/ folders, or step_*.npy files",
    )
    parser.add_argument(
        "--clip",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        help="keep only errors in [LO, HI] before fitting (App. D.2)",
    )
    parser.add_argument(
        "--clip-mode",
        choices=("drop", "clamp"),
        default="drop",
        help="drop errors outside --clip (default) or clamp them to it",
    )
    parser.add_argument(
        "--pool",
        action="store_true",
        help="fit and plot all batches together instead of one panel per step",
    )
    parser.add_argument(
        "--steps", nargs="+", type=int, help="only these steps (as in the file names)"
    )
    parser.add_argument("--bins", type=int, default=80, help="histogram bins")
    parser.add_argument("--out", type=Path, default=Path("bellman_errors.png"), help="PNG to write")
    args = parser.parse_args(argv)
    if args.clip is not None and not args.clip[0] < args.clip[1]:
        parser.exit(
            2, f"{PROG}: --clip LO HI needs LO < HI, got {args.clip[0]:g} {args.clip[1]:g}\n"
        )
    if args.out.suffix.lower() != ".png":
        parser.exit(
            2, f"{PROG}: --out writes a PNG; give a file name ending in .png, got {args.out}\n"
        )
    return args


def main(argv: list[str] | None = None) -> list[tuple[Sample, Fit | None]]:
    args = parse_args(argv)
    clip = tuple(args.clip) if args.clip else None
    samples = load_samples(args.paths, clip, args.clip_mode)
    if args.steps:
        samples = [s for s in samples if s.step in set(args.steps)]
        if not samples:
            raise SystemExit(f"{PROG}: none of the files is for steps {args.steps}")
    if args.pool:
        samples = [pool(samples)]
    fits = [fit_errors(s.errors) if len(np.unique(s.errors)) >= 3 else None for s in samples]
    print_table(samples, fits)
    plot(samples, fits, args.out, args.bins, clip, args.clip_mode)
    print(f"{PROG}: figure written to {args.out}")
    return list(zip(samples, fits))


if __name__ == "__main__":
    main()
