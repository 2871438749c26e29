"""The paper's reported numbers (Garg et al., 2023, *Extreme Q-Learning*), typed in from its tables.

`benchmark/summarize.py` prints these beside our own results. Every value names its table; the
numbers are D4RL normalised scores (0 = random, 100 = expert) as printed in the paper, including its
odd precision (57.75, 41).

- Table 1 (offline, Gym locomotion / AntMaze / Franka Kitchen): IQL, X-QL (one setting per domain)
  and X-QL-T (per-task tuning). The IQL column is IQL's published numbers ("we ... take their
  baseline results", App. D.4).
- Table 2 (AntMaze, offline training then online fine-tuning): IQL and X-QL-T, before -> after.
- Table 3 (Adroit): IQL and X-QL.
- Figure 3 (online DM Control) reports learning curves only: there are no online numbers to compare.

Matching our task names to the paper's (`lookup`): a D4RL name that the paper uses matches exactly.
Another version of the same D4RL dataset (`antmaze-umaze-v2`, `pen-human-v1`) or its Minari port
(`D4RL/antmaze/umaze-v1`, `D4RL/kitchen/complete-v2`, `D4RL/pen/human-v2`) matches approximately:
the summary marks it with "≈", since the data, and for AntMaze the environment, were regenerated.
Minari's `mujoco/<env>/<level>-v0` datasets are NOT matched: they were collected anew on the v5
environments by different policies, and share only a word ("medium") with D4RL's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Table 1: task -> {method: normalised score}.
TABLE_1: dict[str, dict[str, float]] = {
    "halfcheetah-medium-v2": {"IQL": 47.4, "X-QL": 47.7, "X-QL-T": 48.3},
    "hopper-medium-v2": {"IQL": 66.3, "X-QL": 71.1, "X-QL-T": 74.2},
    "walker2d-medium-v2": {"IQL": 78.3, "X-QL": 81.5, "X-QL-T": 84.2},
    "halfcheetah-medium-replay-v2": {"IQL": 44.2, "X-QL": 44.8, "X-QL-T": 45.2},
    "hopper-medium-replay-v2": {"IQL": 94.7, "X-QL": 97.3, "X-QL-T": 100.7},
    "walker2d-medium-replay-v2": {"IQL": 73.9, "X-QL": 65.9, "X-QL-T": 82.2},
    "halfcheetah-medium-expert-v2": {"IQL": 86.7, "X-QL": 89.8, "X-QL-T": 94.2},
    "hopper-medium-expert-v2": {"IQL": 91.5, "X-QL": 107.1, "X-QL-T": 111.2},
    "walker2d-medium-expert-v2": {"IQL": 109.6, "X-QL": 110.1, "X-QL-T": 112.7},
    "antmaze-umaze-v0": {"IQL": 87.5, "X-QL": 87.2, "X-QL-T": 93.8},
    "antmaze-umaze-diverse-v0": {"IQL": 62.2, "X-QL": 57.75, "X-QL-T": 82.0},
    "antmaze-medium-play-v0": {"IQL": 71.2, "X-QL": 73.5, "X-QL-T": 76.0},
    "antmaze-medium-diverse-v0": {"IQL": 70.0, "X-QL": 67.8, "X-QL-T": 73.6},
    "antmaze-large-play-v0": {"IQL": 39.6, "X-QL": 41.0, "X-QL-T": 46.5},
    "antmaze-large-diverse-v0": {"IQL": 47.5, "X-QL": 47.3, "X-QL-T": 49.0},
    "kitchen-complete-v0": {"IQL": 62.5, "X-QL": 72.5, "X-QL-T": 82.4},
    "kitchen-partial-v0": {"IQL": 46.3, "X-QL": 73.8, "X-QL-T": 73.7},
    "kitchen-mixed-v0": {"IQL": 51.0, "X-QL": 54.6, "X-QL-T": 62.5},
}

# Table 2: task -> {method: (score after offline training, score after online fine-tuning)}.
TABLE_2: dict[str, dict[str, tuple[float, float]]] = {
    "antmaze-umaze-v0": {"IQL": (86.7, 96.0), "X-QL-T": (93.8, 99.6)},
    "antmaze-umaze-diverse-v0": {"IQL": (75.0, 84.0), "X-QL-T": (82.0, 99.0)},
    "antmaze-medium-play-v0": {"IQL": (72.0, 95.0), "X-QL-T": (76.0, 97.0)},
    "antmaze-medium-diverse-v0": {"IQL": (68.3, 92.0), "X-QL-T": (73.6, 97.1)},
    "antmaze-large-play-v0": {"IQL": (25.5, 46.0), "X-QL-T": (45.1, 59.3)},
    "antmaze-large-diverse-v0": {"IQL": (42.6, 60.7), "X-QL-T": (49.0, 82.1)},
}

# Table 3: task -> {method: normalised score}.
TABLE_3: dict[str, dict[str, float]] = {
    "pen-human-v0": {"IQL": 71.5, "X-QL": 91.4},
    "hammer-human-v0": {"IQL": 1.4, "X-QL": 5.4},
    "door-human-v0": {"IQL": 4.3, "X-QL": 10.1},
    "relocate-human-v0": {"IQL": 0.1, "X-QL": 1.1},
    "pen-cloned-v0": {"IQL": 37.3, "X-QL": 58.2},
    "hammer-cloned-v0": {"IQL": 2.1, "X-QL": 4.6},
    "door-cloned-v0": {"IQL": 1.6, "X-QL": 8.9},
    "relocate-cloned-v0": {"IQL": -0.2, "X-QL": -0.1},
}

# Our experiment names (`--exp-name`, the benchmark arms) -> the paper's method names. X-QL runs with
# the per-domain settings of Table 4 compare to the X-QL column; X-QL-T is shown beside them because
# the tuned settings are a flag away. An arm ending in "-finetune" compares to Table 2.
ARM_TO_METHODS: dict[str, tuple[str, ...]] = {
    "xql": ("X-QL", "X-QL-T"),
    "xql-t": ("X-QL-T",),
    "iql": ("IQL",),
}

PAPER_TASKS = set(TABLE_1) | set(TABLE_3)


@dataclass(frozen=True)
class PaperScore:
    method: str
    value: str  # formatted as printed in the paper; "a → b" for Table 2
    source: str  # "Table 1", "Table 2", "Table 3"
    exact: bool  # False: our dataset is another version / Minari port of the paper's


def lookup(task: str) -> tuple[str, bool] | None:
    """Map our task name (env id, '/' possibly replaced by '-') to (the paper's task name, exact match?)."""
    name = task.replace("/", "-")
    if name in PAPER_TASKS:
        return name, True
    if name.startswith(
        "mujoco-"
    ):  # Minari's regenerated locomotion data: not D4RL's (see docstring)
        return None
    if name.startswith("D4RL-"):  # Minari port, e.g. D4RL-antmaze-umaze-v1, D4RL-pen-human-v2
        name = name[len("D4RL-") :]
    match = re.fullmatch(r"(.+)-v(\d+)", name)
    if match is None:
        return None
    base = match.group(1)
    for paper_task in PAPER_TASKS:
        if paper_task.rsplit("-v", 1)[0] == base:
            return paper_task, paper_task == name
    return None


def paper_scores(task: str, arm: str) -> list[PaperScore]:
    """The paper's numbers for our `arm` on `task` (empty when the paper has none)."""
    found = lookup(task)
    if found is None:
        return []
    paper_task, exact = found
    finetune = arm.endswith("-finetune")
    methods = ARM_TO_METHODS.get(arm.removesuffix("-finetune"), ())
    scores = []
    for method in methods:
        if finetune:
            if method in TABLE_2.get(paper_task, {}):
                before, after = TABLE_2[paper_task][method]
                scores.append(PaperScore(method, f"{before:g} → {after:g}", "Table 2", exact))
            continue
        for table, source in ((TABLE_1, "Table 1"), (TABLE_3, "Table 3")):
            if method in table.get(paper_task, {}):
                scores.append(PaperScore(method, f"{table[paper_task][method]:g}", source, exact))
    return scores
