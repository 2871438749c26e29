"""Run one script over many (env id, seed) pairs: N parallel workers on this machine, or a Slurm job array.

Every run is `<python> <script> --env-id ENV --seed SEED <extra flags>`, started from the repository
root; everything after `--` is passed to every run, with `{env_id}` and `{seed}` replaced by the run's own
(e.g. `-- --dataset-path data/{env_id}.hdf5`).

Local (N parallel workers, one log per run, a summary of failed runs at the end):

    python benchmark/run_sweep.py --script xsac_continuous.py \\
        --env-ids dm_control/cheetah-run-v0 dm_control/walker-run-v0 --seeds 1 2 3 --workers 2 \\
        -- --exp-name xsac --total-timesteps 500000

    Progress is printed as plain lines (fine in a log file): one per run started / finished, and every
    `--status-interval` seconds the counts, the elapsed time and the last output line of each running
    run. Logs go to `--log-dir` (default `runs/logs/<sweep-name>/`, one `<env>__seed<S>.log` per run).
    The exit status is non-zero if any run failed; Ctrl-C (or SIGTERM) interrupts every run (SIGINT,
    then SIGKILL after `--grace` seconds) and still prints the summary. `--dry-run` prints the commands.

Slurm (one job-array task per (env, seed); writes the batch script, submits it with sbatch):

    python benchmark/run_sweep.py --script xsac_continuous.py --env-ids ... --seeds 1 2 3 \\
        --slurm --partition gpu --time 12:00:00 --gpus 1 --cpus-per-task 4 --mem 16G --max-parallel 20 \\
        --python python --slurm-setup "source .venv/bin/activate" -- --exp-name xsac

    The script (`<log-dir>/<sweep-name>.sbatch`) maps $SLURM_ARRAY_TASK_ID to one run's command, runs it
    from the repo root, and each task logs to `<log-dir>/<job-name>_task<i>_job<id>.log`. `--python`
    defaults to this interpreter's absolute path, which the compute nodes must see (shared filesystem);
    with `--slurm-setup` activating an environment, pass `--python python`. `--no-submit` only writes
    the script, `--dry-run` prints it, `--wait` stays until the array is done and reports failed tasks.

Preemptible runs (`--slurm --requeue`, with `-- --checkpoint-freq N`): every task writes to a run
folder fixed at submission (`runs/{env}__{exp_name}__{seed}__{submit time}`, as the scripts name
theirs) and asks Slurm to requeue it (`#SBATCH --requeue`). When a task starts and that folder
holds a checkpoint, it continues with `--resume` instead of starting over. Slurm's SIGTERM
(preemption, `scontrol requeue`) makes the run checkpoint and stop; `--signal-lead S` seconds
before the time limit (`#SBATCH --signal=B:USR1@S`) it checkpoints, stops and requeues itself.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROG = "run_sweep"
LOG_MARK = "# run_sweep:"  # starts the lines the runner itself writes into a run's log


@dataclass
class Run:
    """One (env id, seed) run of the sweep and, once started, its process and outcome."""

    index: int
    env_id: str
    seed: int
    command: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    log_file: object = None
    start_time: float = 0.0
    end_time: float = 0.0
    return_code: int | None = None
    interrupted: bool = False
    slot: int = 0
    run_dir: str | None = None  # --requeue: the run's stable folder (its checkpoint lives there)

    @property
    def label(self) -> str:
        return f"{self.env_id} seed {self.seed}"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split argv at the first `--`: the left part is ours, the right part goes to every run."""
    if "--" in argv:
        split = argv.index("--")
        own, extra = argv[:split], argv[split + 1 :]
    else:
        own, extra = argv, []
    parser = argparse.ArgumentParser(
        prog="run_sweep.py",
        description="Run a script over env ids x seeds with N local workers, or as a Slurm job array. "
        "Flags after `--` are passed to every run.",
    )
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--script",
        required=True,
        help="script to run (path from the current folder or the repo root)",
    )
    sweep.add_argument(
        "--env-ids", nargs="+", required=True, metavar="ENV_ID", help="environment / dataset ids"
    )
    sweep.add_argument(
        "--seeds", nargs="+", type=int, default=[1], metavar="SEED", help="seeds (default: 1)"
    )
    sweep.add_argument(
        "--python", default=sys.executable, help="interpreter for the runs (default: this one)"
    )
    sweep.add_argument(
        "--sweep-name",
        default=None,
        help="name of the sweep (default: <exp-name or script stem>__<date-time>)",
    )
    sweep.add_argument(
        "--log-dir",
        default=None,
        help="folder for the per-run logs (default: runs/logs/<sweep-name>, under the repo root)",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would run (or the Slurm script); start nothing, write nothing",
    )

    local = parser.add_argument_group("local workers")
    local.add_argument("--workers", type=int, default=1, help="runs at the same time (default: 1)")
    local.add_argument(
        "--threads-per-run",
        type=int,
        default=None,
        help="OMP/MKL threads per run (default: CPU count // workers when workers > 1 and "
        "OMP_NUM_THREADS is unset, so parallel runs do not oversubscribe the cores)",
    )
    local.add_argument(
        "--cuda-devices",
        nargs="+",
        default=None,
        metavar="ID",
        help="GPUs to spread the runs over: each worker slot gets one (CUDA_VISIBLE_DEVICES), "
        "round-robin, e.g. --workers 4 --cuda-devices 0 1 puts two runs on each GPU",
    )
    local.add_argument(
        "--status-interval",
        type=float,
        default=60.0,
        help="seconds between status lines listing the running runs (default: 60)",
    )
    local.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds runs get to exit after Ctrl-C before they are killed (default: 10)",
    )

    slurm = parser.add_argument_group("slurm")
    slurm.add_argument(
        "--slurm",
        action="store_true",
        help="write a Slurm job-array script and submit it with sbatch",
    )
    slurm.add_argument(
        "--no-submit", action="store_true", help="with --slurm: write the script, do not submit it"
    )
    slurm.add_argument(
        "--partition", default=None, help="#SBATCH --partition (default: the cluster's default)"
    )
    slurm.add_argument(
        "--time", default="24:00:00", help="#SBATCH --time per task (default: 24:00:00)"
    )
    slurm.add_argument(
        "--gpus", type=int, default=0, help="#SBATCH --gpus per task (default: 0, none requested)"
    )
    slurm.add_argument(
        "--gres", default=None, help="#SBATCH --gres, e.g. gpu:1, for clusters without --gpus"
    )
    slurm.add_argument(
        "--cpus-per-task", type=int, default=4, help="#SBATCH --cpus-per-task (default: 4)"
    )
    slurm.add_argument("--mem", default="16G", help="#SBATCH --mem per task (default: 16G)")
    slurm.add_argument(
        "--job-name", default=None, help="#SBATCH --job-name (default: the sweep name)"
    )
    slurm.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        help="array tasks running at once, the %%N of --array (default: no limit)",
    )
    slurm.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH line, e.g. --sbatch-option=--account=myproj (repeatable)",
    )
    slurm.add_argument(
        "--slurm-setup",
        action="append",
        default=[],
        metavar="COMMAND",
        help="shell line run before each task, e.g. 'module load cuda' or "
        "'source .venv/bin/activate' (repeatable)",
    )
    slurm.add_argument(
        "--wait",
        action="store_true",
        help="with --slurm: stay until the array finishes, print progress (every --status-interval "
        "s) and the failed tasks; exit non-zero if any failed. Ctrl-C stops waiting, not the jobs",
    )
    slurm.add_argument(
        "--requeue",
        action="store_true",
        help="with --slurm: each task writes to a stable run folder (--run-dir) and, when Slurm "
        "requeues it (preemption, `scontrol requeue`, or the time-limit warning of --signal-lead), "
        "resumes from the checkpoint there (pass --checkpoint-freq N to the script for periodic "
        "ones; a stop by signal always writes one)",
    )
    slurm.add_argument(
        "--signal-lead",
        type=int,
        default=120,
        help="with --requeue: seconds before the time limit at which the task checkpoints, stops "
        "and requeues itself (#SBATCH --signal=B:USR1@N; default: 120)",
    )
    slurm.add_argument(
        "--sbatch", default="sbatch", help="sbatch executable (default: sbatch on PATH)"
    )
    return parser.parse_args(own), extra


def fail(message: str) -> SystemExit:
    return SystemExit(f"{PROG}: {message}")


def resolve_script(script: str) -> Path:
    """The script as an absolute path: as given, else from the current folder, else from the repo
    root.
    """
    candidates = (
        [Path(script)] if Path(script).is_absolute() else [Path.cwd() / script, REPO_ROOT / script]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise fail(
        f"--script {script} not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
        "give a path to an existing script"
    )


def flag_value(extra: list[str], flag: str) -> str | None:
    """Value of `flag` among the pass-through flags (`--flag value` or `--flag=value`), if present."""
    for i, token in enumerate(extra):
        if token == flag and i + 1 < len(extra):
            return extra[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def validate(args: argparse.Namespace, extra: list[str]) -> None:
    """Reject user mistakes with one line each, before anything is written or started."""
    for name, values in (("--env-ids", args.env_ids), ("--seeds", args.seeds)):
        duplicates = sorted({str(v) for v in values if values.count(v) > 1})
        if duplicates:
            raise fail(f"{name} lists {', '.join(duplicates)} more than once; give each once")
    for flag in ("--env-id", "--seed"):
        if flag in extra or any(token.startswith(flag + "=") for token in extra):
            raise fail(
                f"{flag} after `--` clashes with the runner's own {flag}; set it with --env-ids / --seeds"
            )
    if args.workers < 1:
        raise fail(f"--workers must be at least 1, got {args.workers}")
    if args.cuda_devices is not None and not all(
        re.fullmatch(r"[A-Za-z0-9-]+", d) for d in args.cuda_devices
    ):
        raise fail(
            f"--cuda-devices takes device ids or UUIDs, e.g. 0 1; got {' '.join(args.cuda_devices)}"
        )
    if args.threads_per_run is not None and args.threads_per_run < 1:
        raise fail(f"--threads-per-run must be at least 1, got {args.threads_per_run}")
    if args.sweep_name is not None and not re.fullmatch(r"[A-Za-z0-9._+-]+", args.sweep_name):
        raise fail(f"--sweep-name {args.sweep_name!r} may hold only letters, digits and . _ + -")
    if not args.slurm:
        if shutil.which(args.python) is None:
            raise fail(
                f"--python {args.python} is not an executable; give the interpreter that runs the scripts"
            )
        if args.no_submit or args.wait or args.requeue:
            raise fail("--no-submit, --wait and --requeue only make sense with --slurm")
        return
    if args.requeue and any(flag_value(extra, f) for f in ("--run-dir", "--resume")):
        raise fail(
            "--requeue gives every task its own --run-dir and --resume: drop them after `--`"
        )
    if args.signal_lead < 1:
        raise fail(f"--signal-lead must be at least 1 second, got {args.signal_lead}")
    if args.wait and args.no_submit:
        raise fail("--wait needs a submitted job: drop --no-submit")
    if args.cpus_per_task < 1 or args.gpus < 0:
        raise fail("--cpus-per-task must be at least 1 and --gpus at least 0")
    if args.gpus and args.gres:
        raise fail("give either --gpus or --gres, not both")
    if args.job_name is not None and not re.fullmatch(r"[A-Za-z0-9._+-]+", args.job_name):
        raise fail(f"--job-name {args.job_name!r} may hold only letters, digits and . _ + -")
    bad_options = [option for option in args.sbatch_option if not option.startswith("-")]
    if bad_options:
        raise fail(
            f"--sbatch-option {bad_options[0]!r} is not an sbatch option; "
            "write it as --sbatch-option=--account=X"
        )
    if args.max_parallel is not None and args.max_parallel < 1:
        raise fail(f"--max-parallel must be at least 1, got {args.max_parallel}")
    if not re.fullmatch(r"[0-9:-]+", args.time):
        raise fail(f"--time {args.time!r} is not a Slurm time limit (e.g. 12:00:00 or 1-00:00:00)")
    if not (args.dry_run or args.no_submit) and shutil.which(args.sbatch) is None:
        raise fail(
            f"{args.sbatch} not found: is Slurm installed here? Use --no-submit to only write the script"
        )
    if args.wait and not args.dry_run:
        for tool in ("squeue", "scontrol"):
            if shutil.which(tool) is None:
                raise fail(f"--wait needs {tool}, which is not on PATH; submit without --wait")


def display_path(path: Path) -> str:
    """Path relative to the repo root when it lies inside it (shorter commands and logs), else
    absolute.
    """
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def build_runs(
    args: argparse.Namespace, extra: list[str], script: Path, log_dir: Path
) -> list[Run]:
    """Seed-major order: the first seed of every task finishes first, so early results cover all
    tasks.
    """
    runs = []
    for seed in args.seeds:
        for env_id in args.env_ids:
            # {env_id} and {seed} in the flags after `--` take each run's own values (e.g. a
            # per-dataset file)
            own_extra = [
                token.replace("{env_id}", env_id).replace("{seed}", str(seed)) for token in extra
            ]
            command = [
                args.python,
                display_path(script),
                "--env-id",
                env_id,
                "--seed",
                str(seed),
                *own_extra,
            ]
            log_path = log_dir / f"{env_id.replace('/', '-')}__seed{seed}.log"
            runs.append(Run(len(runs), env_id, seed, command, log_path))
            if args.slurm and args.requeue:  # a folder named as the scripts name theirs, fixed now
                runs_dir = flag_value(extra, "--runs-dir") or "runs"
                exp_name = flag_value(extra, "--exp-name") or script.stem
                name = f"{env_id.replace('/', '-')}__{exp_name}__{seed}__{int(time.time())}"
                runs[-1].run_dir = f"{runs_dir}/{name}"
    return runs


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def last_line(path: Path, limit: int = 100) -> str:
    """Last non-empty line a run wrote to its log (read from the end), cut to `limit` characters."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [
                line.strip()
                for line in f.read().decode(errors="replace").splitlines()
                if line.strip() and not line.startswith(LOG_MARK)
            ]
    except OSError:
        return ""
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_local(args: argparse.Namespace, runs: list[Run], log_dir: Path) -> int:
    """Run the sweep with `args.workers` parallel processes; returns the exit status (0, 1 failed,
    130 interrupted).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    threads = args.threads_per_run
    if threads is None and args.workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_dir.mkdir(parents=True, exist_ok=True)

    total, sweep_start = len(runs), time.monotonic()
    waiting, running, done = list(runs), [], []

    def say(message: str) -> None:
        print(f"[{format_duration(time.monotonic() - sweep_start)}] {message}", flush=True)

    def counts() -> str:
        failed = sum(r.return_code != 0 for r in done)
        return f"{len(done)}/{total} finished ({failed} failed), {len(running)} running, {len(waiting)} waiting"

    free_slots = list(
        range(args.workers)
    )  # worker slot -> GPU, so runs on one GPU never exceed its share

    def start(run: Run) -> None:
        run.slot = free_slots.pop(0)
        run_env = env
        if args.cuda_devices:
            run_env = dict(
                env, CUDA_VISIBLE_DEVICES=args.cuda_devices[run.slot % len(args.cuda_devices)]
            )
        run.log_file = open(run.log_path, "w")
        run.log_file.write(
            f"{LOG_MARK} command: {shlex.join(run.command)}\n{LOG_MARK} cwd: {REPO_ROOT}\n"
            f"{LOG_MARK} started: {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        run.log_file.flush()
        run.start_time = time.monotonic()
        # Own session: the terminal's Ctrl-C reaches only the runner, which then stops each run
        # itself.
        run.process = subprocess.Popen(
            run.command,
            cwd=REPO_ROOT,
            env=run_env,
            stdout=run.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        running.append(run)
        device = f", GPU {run_env['CUDA_VISIBLE_DEVICES']}" if args.cuda_devices else ""
        say(
            f"started  [{run.index + 1}/{total}] {run.label} (pid {run.process.pid}{device}) -> "
            f"{display_path(run.log_path)}"
        )

    def finish(run: Run, return_code: int) -> None:
        run.return_code, run.end_time = return_code, time.monotonic()
        run.log_file.write(
            f"\n{LOG_MARK} exit code {return_code} after "
            f"{format_duration(run.end_time - run.start_time)}\n"
        )
        run.log_file.close()
        running.remove(run)
        free_slots.append(run.slot)
        done.append(run)
        if run.interrupted:
            outcome = f"stopped (exit {return_code})"
        elif return_code == 0:
            outcome = "ok"
        else:
            outcome = f"FAILED (exit {return_code}), log: {display_path(run.log_path)}"
        say(
            f"finished [{run.index + 1}/{total}] {run.label} in "
            f"{format_duration(run.end_time - run.start_time)}: {outcome} | {counts()}"
        )

    # SIGINT (Ctrl-C) and SIGTERM only set a flag that the loop reads, so a run is never left
    # half-started; installed explicitly, so this also works when a shell started the runner with
    # SIGINT ignored (`&`).
    stop_signals: list[int] = []

    def on_signal(signum, frame):
        stop_signals.append(signum)

    previous_handlers = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    print(
        f"{PROG}: {total} runs, {args.workers} workers"
        + (f", {threads} threads per run" if threads is not None else "")
        + f", logs in {display_path(log_dir)}",
        flush=True,
    )
    try:
        last_status = time.monotonic()
        while (waiting or running) and not stop_signals:
            while waiting and len(running) < args.workers and not stop_signals:
                start(waiting.pop(0))
            for run in list(running):
                if (return_code := run.process.poll()) is not None:
                    finish(run, return_code)
            if time.monotonic() - last_status >= args.status_interval and running:
                last_status = time.monotonic()
                say(f"status: {counts()}")
                for run in running:
                    print(
                        f"    {run.label} ({format_duration(time.monotonic() - run.start_time)}): "
                        f"{last_line(run.log_path) or '(no output yet)'}",
                        flush=True,
                    )
            time.sleep(0.2)
        if stop_signals:
            for run in list(
                running
            ):  # those that ended on their own before the signal keep their outcome
                if (return_code := run.process.poll()) is not None:
                    finish(run, return_code)
            say(
                f"interrupted: stopping {len(running)} running runs (SIGINT, SIGKILL after {args.grace:g} s)"
            )
            stop_runs(running, args.grace)
            for run in list(running):
                run.interrupted = True
                finish(run, run.process.returncode)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    return print_summary(done, waiting, time.monotonic() - sweep_start, bool(stop_signals))


def stop_runs(running: list[Run], grace: float) -> None:
    """SIGINT each run's process group (Python raises KeyboardInterrupt); SIGKILL what is left after
    `grace` s.
    """
    for run in running:
        try:
            os.killpg(run.process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for run in running:
        try:
            run.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for run in running:
        try:
            os.killpg(run.process.pid, signal.SIGKILL)  # also reaps children a run left behind
        except ProcessLookupError:
            pass
        run.process.wait()


def print_summary(done: list[Run], waiting: list[Run], elapsed: float, interrupted: bool) -> int:
    failed = [r for r in done if r.return_code != 0 and not r.interrupted]
    stopped = [r for r in done if r.interrupted]
    ok = len(done) - len(failed) - len(stopped)
    print(
        f"\n{PROG}: summary after {format_duration(elapsed)}: {ok} ok, {len(failed)} failed"
        + (
            f", {len(stopped)} stopped and {len(waiting)} not started (interrupted)"
            if interrupted
            else ""
        ),
        flush=True,
    )
    for run in failed:
        print(
            f"  FAILED {run.label}: exit code {run.return_code}, log: {display_path(run.log_path)}"
        )
        print(f"         last line: {last_line(run.log_path)}")
    for run in stopped:
        print(
            f"  STOPPED {run.label}: exit code {run.return_code}, log: {display_path(run.log_path)}"
        )
    if interrupted:
        return 130
    return 1 if failed else 0


def slurm_script(args: argparse.Namespace, runs: list[Run], log_dir: Path, sweep_name: str) -> str:
    """A bash job-array script: task i runs runs[i] from the repo root, its output in the log dir."""
    array = f"0-{len(runs) - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    options = [
        f"--job-name={args.job_name or sweep_name}",
        f"--array={array}",
        f"--output={log_dir}/%x_task%a_job%A.log",
        f"--time={args.time}",
        f"--cpus-per-task={args.cpus_per_task}",
        f"--mem={args.mem}",
    ]
    if args.partition:
        options.append(f"--partition={args.partition}")
    if args.gpus:
        options.append(f"--gpus={args.gpus}")
    if args.gres:
        options.append(f"--gres={args.gres}")
    if args.requeue:  # requeue on preemption; USR1 to the batch shell before the time limit
        options += ["--requeue", f"--signal=B:USR1@{args.signal_lead}", "--open-mode=append"]
    options += args.sbatch_option
    lines = [
        "#!/bin/bash",
        f"# Generated by benchmark/run_sweep.py on {time.strftime('%Y-%m-%d %H:%M:%S')}: sweep {sweep_name},",
        f"# {len(runs)} runs, one array task per (env id, seed). Task -> run:",
    ]
    lines += [f"#   {run.index}: {run.label}" for run in runs]
    lines += [f"#SBATCH {option}" for option in options]
    # No `set -u`: environment set-up scripts (conda, module) often read unset variables.
    lines += [
        "",
        "set -eo pipefail",
        f"cd {shlex.quote(str(REPO_ROOT))}",
        *args.slurm_setup,
        "export PYTHONUNBUFFERED=1",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" MKL_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "",
        'case "${SLURM_ARRAY_TASK_ID:?not running as a Slurm array task}" in',
    ]
    for run in runs:
        if args.requeue:
            run_dir = shlex.quote(run.run_dir)
            lines.append(
                f"  {run.index}) command=({shlex.join(run.command)}); run_dir={run_dir} ;;"
            )
        else:
            lines.append(f"  {run.index}) command=({shlex.join(run.command)}) ;;")
    lines += [
        '  *) echo "run_sweep: no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
    ]
    if args.requeue:
        lines += REQUEUE_LINES
    else:
        lines += [
            'echo "# run_sweep: task $SLURM_ARRAY_TASK_ID on $(hostname) at $(date): ${command[*]}"',
            'exec "${command[@]}"',
        ]
    return "\n".join(lines + [""])


# --requeue: the task resumes from its run folder's checkpoint when there is one. Slurm's SIGTERM
# (preemption, `scontrol requeue`) and its USR1 before the time limit reach the run, which writes
# its checkpoint and stops; after USR1 the task also requeues itself.
REQUEUE_LINES = [
    'if [ -f "$run_dir/checkpoint.pt" ]; then',
    '  command+=(--resume "$run_dir/checkpoint.pt")',
    "else",
    '  command+=(--run-dir "$run_dir")',
    "fi",
    'echo "# run_sweep: task $SLURM_ARRAY_TASK_ID on $(hostname) at $(date): ${command[*]}"',
    "requeue=0",
    '"${command[@]}" &',
    "pid=$!",
    "trap 'requeue=1; kill -USR1 $pid' USR1",
    "trap 'kill -TERM $pid' TERM",
    "status=0",
    'while kill -0 "$pid" 2>/dev/null; do wait "$pid" || status=$?; done',
    'if [ "$requeue" = 1 ]; then',
    '  echo "# run_sweep: stopped before the time limit; requeueing job $SLURM_JOB_ID"',
    '  scontrol requeue "$SLURM_JOB_ID"',
    "fi",
    'exit "$status"',
]


def submit_slurm(args: argparse.Namespace, runs: list[Run], log_dir: Path, sweep_name: str) -> int:
    text = slurm_script(args, runs, log_dir, sweep_name)
    if args.dry_run:
        print(text)
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path = log_dir / f"{sweep_name}.sbatch"
    temporary = script_path.with_suffix(".sbatch.tmp")
    temporary.write_text(text)
    temporary.chmod(0o755)
    os.replace(temporary, script_path)
    print(
        f"{PROG}: wrote the Slurm job-array script ({len(runs)} tasks): {script_path}", flush=True
    )
    if args.no_submit:
        print(f"{PROG}: not submitted (--no-submit); submit it with: sbatch {script_path}")
        return 0
    result = subprocess.run(
        [args.sbatch, "--parsable", str(script_path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        message = (
            " ".join((result.stderr or result.stdout).split()) or f"exit code {result.returncode}"
        )
        raise fail(f"sbatch refused {script_path}: {message}")
    job_id = result.stdout.strip().split(";")[0]
    job_name = args.job_name or sweep_name
    print(
        f"{PROG}: submitted job array {job_id} ({len(runs)} tasks); script: {script_path}",
        flush=True,
    )
    print(
        f"{PROG}: watch it with `squeue -j {job_id}`; logs: {log_dir}/{job_name}_task<i>_job{job_id}.log",
        flush=True,
    )
    if not args.wait:
        return 0
    for run in runs:
        run.log_path = log_dir / f"{job_name}_task{run.index}_job{job_id}.log"
    return wait_for_array(args, job_id, runs)


def wait_for_array(args: argparse.Namespace, job_id: str, runs: list[Run]) -> int:
    """Poll squeue until the array has left the queue, then report each task's final state
    (scontrol, else sacct).
    """
    start, last_status, last_counts = time.monotonic(), 0.0, ""
    try:
        while True:
            queue = subprocess.run(
                ["squeue", "-h", "-r", "-j", job_id, "-o", "%K %T"], capture_output=True, text=True
            )
            if queue.returncode != 0 and "Invalid job id" not in queue.stderr:
                raise fail(
                    f"squeue failed while waiting for job {job_id}: {' '.join(queue.stderr.split())}"
                )
            states = [
                line.split()[1] for line in queue.stdout.splitlines() if len(line.split()) == 2
            ]
            if not states:
                break
            counts = ", ".join(
                f"{states.count(state)} {state.lower()}" for state in sorted(set(states))
            )
            if counts != last_counts or time.monotonic() - last_status >= args.status_interval:
                done = len(runs) - len(states)
                print(
                    f"[{format_duration(time.monotonic() - start)}] job {job_id}: {done}/{len(runs)} finished, "
                    f"{counts}",
                    flush=True,
                )
                last_status, last_counts = time.monotonic(), counts
            time.sleep(min(args.status_interval, 5.0))
    except KeyboardInterrupt:
        print(
            f"\n{PROG}: stopped waiting; job {job_id} keeps running (`scancel {job_id}` stops it)"
        )
        return 130

    outcomes = array_task_outcomes(job_id)
    failed = [
        (run, outcomes.get(run.index))
        for run in runs
        if outcomes.get(run.index) != ("COMPLETED", "0:0")
    ]
    print(
        f"\n{PROG}: job {job_id} done after {format_duration(time.monotonic() - start)}: "
        f"{len(runs) - len(failed)} ok, {len(failed)} failed"
    )
    for run, outcome in failed:
        state = f"{outcome[0]}, exit code {outcome[1]}" if outcome else "state unknown (see sacct)"
        print(f"  FAILED {run.label} (task {run.index}): {state}, log: {run.log_path}")
        print(f"         last line: {last_line(run.log_path)}")
    return 1 if failed else 0


def array_task_outcomes(job_id: str) -> dict[int, tuple[str, str]]:
    """{array task id: (state, exit code "code:signal")}: from scontrol while the controller still holds the
    records (MinJobAge, 300 s by default), else from sacct where accounting is enabled."""
    outcomes = {}
    shown = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True
    )
    for line in shown.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if fields.get("ArrayTaskId", "").isdigit():
            outcomes[int(fields["ArrayTaskId"])] = (
                fields.get("JobState", "?"),
                fields.get("ExitCode", "?"),
            )
    if not outcomes and shutil.which("sacct"):
        accounted = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"],
            capture_output=True,
            text=True,
        )
        for line in accounted.stdout.splitlines():
            task, state, exit_code = (line.split("|") + ["", "", ""])[:3]
            if "_" in task and task.split("_", 1)[1].isdigit():
                outcomes[int(task.split("_", 1)[1])] = (
                    state.split()[0] if state else "?",
                    exit_code,
                )
    return outcomes


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    script = resolve_script(args.script)
    validate(args, extra)
    if (
        not args.slurm and os.sep in args.python
    ):  # runs start in the repo root: keep a relative interpreter path valid
        args.python = str(Path(args.python).absolute())
    default_name = (
        f"{flag_value(extra, '--exp-name') or script.stem}__{time.strftime('%Y%m%d-%H%M%S')}"
    )
    sweep_name = args.sweep_name or re.sub(r"[^A-Za-z0-9._+-]", "-", default_name)
    log_dir = Path(args.log_dir) if args.log_dir else REPO_ROOT / "runs" / "logs" / sweep_name
    log_dir = log_dir.resolve()
    runs = build_runs(args, extra, script, log_dir)
    if args.slurm:
        return submit_slurm(args, runs, log_dir, sweep_name)
    clashing = [r.log_path for r in runs if r.log_path.exists()]
    if clashing:
        raise fail(
            f"{display_path(clashing[0])} already exists (an earlier sweep?); "
            "pick another --log-dir or --sweep-name"
        )
    if args.dry_run:
        for run in runs:
            print(f"{shlex.join(run.command)}  > {display_path(run.log_path)}")
        print(f"{PROG}: {len(runs)} runs, {args.workers} workers (dry run: nothing started)")
        return 0
    return run_local(args, runs, log_dir)


if __name__ == "__main__":
    sys.exit(main())
