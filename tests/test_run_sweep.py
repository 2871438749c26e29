"""benchmark/run_sweep.py: local workers (flags, logs, failures, Ctrl-C), the Slurm job-array script, and a
real single-node Slurm (slurmctld + slurmd started by the test) running a tiny sweep to completion.

The swept script is a tiny one the tests write: it records its argv, cwd and thread setting in a JSON file,
so the checks do not depend on the algorithm scripts.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "benchmark" / "run_sweep.py"

TINY_SCRIPT = """
import argparse, json, os, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--env-id", required=True)
parser.add_argument("--seed", type=int, required=True)
parser.add_argument("--out-dir", required=True)
parser.add_argument("--tag", default="")
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--fail", default="", help="env_id:seed that exits with code 7")
parser.add_argument("--wait-for-peers", type=int, default=0, help="wait until this many runs have started")
args = parser.parse_args()
name = f"{args.env_id.replace('/', '-')}_{args.seed}"
out = args.out_dir
open(os.path.join(out, f"started_{name}"), "w").write(str(os.getpid()))
print(f"hello from {args.env_id} seed {args.seed}", flush=True)
deadline = time.time() + 20
while len([f for f in os.listdir(out) if f.startswith("started_")]) < args.wait_for_peers:
    if time.time() > deadline:
        print("no parallel peer started", flush=True)
        sys.exit(9)
    time.sleep(0.05)
time.sleep(args.sleep)
if args.fail == f"{args.env_id}:{args.seed}":
    print("deliberate failure", flush=True)
    sys.exit(7)
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "omp": os.environ.get("OMP_NUM_THREADS"),
          "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}
with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(record, f)
"""

ENV_IDS = ["suite/alpha-v0", "beta-v1"]
SEEDS = [1, 2]


def load_runner():
    """Import benchmark/run_sweep.py by path (registered in sys.modules first, as dataclasses need)."""
    if "run_sweep" in sys.modules:
        return sys.modules["run_sweep"]
    spec = importlib.util.spec_from_file_location("run_sweep", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_sweep"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny(tmp_path):
    script = tmp_path / "tiny_train.py"
    script.write_text(TINY_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    return script, out


def expected_argv(env_id, seed, extra):
    return ["--env-id", env_id, "--seed", str(seed), *extra]


def test_local_sweep_passes_flags_logs_every_run_and_reports_the_failure(
    tiny, tmp_path, capsys, monkeypatch
):
    script, out = tiny
    log_dir = tmp_path / "logs"
    monkeypatch.chdir(tmp_path)  # runs start from the repo root wherever the runner is called from
    # --wait-for-peers 2: the first two runs only get past it if both run at the same time (2 workers).
    extra = [
        "--out-dir",
        str(out),
        "--tag",
        "a b",
        "--wait-for-peers",
        "2",
        "--fail",
        "beta-v1:2",
        "--sleep",
        "0.5",
    ]
    status = load_runner().main(
        [
            "--script",
            str(script),
            "--env-ids",
            *ENV_IDS,
            "--seeds",
            "1",
            "2",
            "--workers",
            "2",
            "--threads-per-run",
            "1",
            "--cuda-devices",
            "3",
            "5",
            "--log-dir",
            str(log_dir),
            "--status-interval",
            "0.1",
            "--",
            *extra,
        ]
    )
    console = capsys.readouterr().out
    assert status == 1, console

    gpus = {}
    for env_id in ENV_IDS:
        for seed in SEEDS:
            name = f"{env_id.replace('/', '-')}_{seed}"
            log = (log_dir / f"{env_id.replace('/', '-')}__seed{seed}.log").read_text()
            assert f"hello from {env_id} seed {seed}" in log
            assert f"--env-id {env_id} --seed {seed}" in log  # the command heads the log
            if (env_id, seed) == ("beta-v1", 2):
                assert not (out / f"{name}.json").exists()
                assert "deliberate failure" in log and "exit code 7" in log
                continue
            record = json.loads((out / f"{name}.json").read_text())
            assert record["argv"] == expected_argv(env_id, seed, extra)
            assert Path(record["cwd"]) == ROOT
            assert record["omp"] == "1"
            gpus[(env_id, seed)] = record["gpu"]
            assert "exit code 0" in log

    # the two runs that ran together (the first two) each had a GPU of their own
    assert {gpus[(ENV_IDS[0], 1)], gpus[(ENV_IDS[1], 1)]} == {"3", "5"} and gpus[
        (ENV_IDS[0], 2)
    ] in {"3", "5"}

    summary = console[console.index("summary") :]
    assert "3 ok, 1 failed" in summary
    failure_lines = [line for line in summary.splitlines() if line.strip().startswith("FAILED")]
    assert len(failure_lines) == 1
    assert "beta-v1 seed 2: exit code 7" in failure_lines[0]
    assert str(log_dir / "beta-v1__seed2.log") in failure_lines[0]
    assert "last line: deliberate failure" in summary
    # progress display: a line per start and finish, and status lines naming the running runs
    assert console.count("started  [") == 4 and console.count("finished [") == 4
    assert "status:" in console and "hello from" in console


def test_dry_run_prints_commands_and_writes_nothing(tiny, tmp_path, capsys):
    script, out = tiny
    log_dir = tmp_path / "logs"
    status = load_runner().main(
        [
            "--script",
            str(script),
            "--env-ids",
            *ENV_IDS,
            "--seeds",
            "3",
            "--log-dir",
            str(log_dir),
            "--dry-run",
            "--",
            "--out-dir",
            str(out),
        ]
    )
    console = capsys.readouterr().out
    assert status == 0
    assert not log_dir.exists() and list(out.iterdir()) == []
    for env_id in ENV_IDS:
        assert f"--env-id {env_id} --seed 3 --out-dir {out}" in console


def test_env_id_and_seed_placeholders_in_passed_flags(tiny, tmp_path, capsys):
    """`{env_id}` and `{seed}` after `--` become each run's own (a per-dataset file, a per-seed folder)."""
    script, out = tiny
    status = load_runner().main(
        [
            "--script",
            str(script),
            "--env-ids",
            *ENV_IDS,
            "--seeds",
            "3",
            "4",
            "--dry-run",
            "--log-dir",
            str(tmp_path / "logs"),
            "--",
            "--out-dir",
            f"{out}/{{env_id}}_{{seed}}",
        ]
    )
    console = capsys.readouterr().out
    assert status == 0
    for env_id in ENV_IDS:
        for seed in (3, 4):
            assert f"--env-id {env_id} --seed {seed} --out-dir {out}/{env_id}_{seed}" in console
    assert "{env_id}" not in console and "{seed}" not in console


def test_ctrl_c_stops_the_running_runs_and_still_summarises(tiny, tmp_path):
    script, out = tiny
    log_dir = tmp_path / "logs"
    runner = subprocess.Popen(
        [
            sys.executable,
            str(RUNNER),
            "--script",
            str(script),
            "--env-ids",
            *ENV_IDS,
            "a-third-v0",
            "--workers",
            "2",
            "--grace",
            "5",
            "--log-dir",
            str(log_dir),
            "--",
            "--out-dir",
            str(out),
            "--sleep",
            "120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(list(out.glob("started_*"))) < 2:
            assert runner.poll() is None and time.monotonic() < deadline, (
                "the two first runs did not start"
            )
            time.sleep(0.05)
        run_pids = [int(p.read_text()) for p in out.glob("started_*")]
        runner.send_signal(signal.SIGINT)
        console, _ = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 130, console
    assert "0 ok, 0 failed, 2 stopped and 1 not started (interrupted)" in console
    assert console.count("STOPPED") == 2
    for (
        env_id
    ) in ENV_IDS:  # stopped with SIGINT first (a clean KeyboardInterrupt), not killed outright
        assert (
            "KeyboardInterrupt" in (log_dir / f"{env_id.replace('/', '-')}__seed1.log").read_text()
        )
    for pid in run_pids:  # reaped by the runner: no such process any more
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (log_dir / "a-third-v0__seed1.log").exists()


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (
            ["--script", "no/such/script.py", "--env-ids", "e"],
            "--script no/such/script.py not found",
        ),
        (["--env-ids", "e", "--seeds", "1", "1"], "--seeds lists 1 more than once"),
        (["--env-ids", "e", "--", "--seed", "4"], "--seed after `--` clashes"),
        (["--env-ids", "e", "--workers", "0"], "--workers must be at least 1"),
        (
            ["--env-ids", "e", "--slurm", "--gpus", "1", "--gres", "gpu:1", "--no-submit"],
            "either --gpus or --gres",
        ),
        (
            ["--env-ids", "e", "--slurm", "--time", "two hours", "--no-submit"],
            "is not a Slurm time limit",
        ),
        (["--env-ids", "e", "--slurm", "--sbatch", "/no/sbatch/here"], "/no/sbatch/here not found"),
        (["--env-ids", "e", "--wait"], "only make sense with --slurm"),
        (
            ["--env-ids", "e", "--slurm", "--no-submit", "--sbatch-option", "account=x"],
            "'account=x' is not an sbatch option",
        ),
        (["--env-ids", "e", "--slurm", "--wait", "--no-submit"], "--wait needs a submitted job"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(tiny, tmp_path, argv_tail, message):
    script, _ = tiny
    log_dir = tmp_path / "logs"
    script_flag = [] if "--script" in argv_tail else ["--script", str(script)]
    argv = ["--log-dir", str(log_dir), *script_flag, *argv_tail]
    with pytest.raises(SystemExit) as error:
        load_runner().main(argv)
    assert str(error.value).startswith("run_sweep: ") and message in str(error.value)
    assert "\n" not in str(error.value)
    assert not log_dir.exists()


def test_user_error_from_the_command_line_has_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            "--script",
            "missing.py",
            "--env-ids",
            "e",
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stderr.strip().startswith("run_sweep: --script missing.py not found")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "logs").exists()


def write_slurm_script(runner, script, out, log_dir, *options):
    status = runner.main(
        [
            "--script",
            str(script),
            "--env-ids",
            *ENV_IDS,
            "--seeds",
            "1",
            "2",
            "--slurm",
            "--no-submit",
            "--sweep-name",
            "tiny-sweep",
            "--log-dir",
            str(log_dir),
            *options,
            "--",
            "--out-dir",
            str(out),
            "--tag",
            "x y",
        ]
    )
    assert status == 0
    return log_dir / "tiny-sweep.sbatch"


def test_slurm_script_maps_every_array_task_to_its_run(tiny, tmp_path):
    """Without a cluster: parse the #SBATCH header, then run the script with bash once per array task id."""
    script, out = tiny
    log_dir = tmp_path / "logs"
    batch = write_slurm_script(
        load_runner(),
        script,
        out,
        log_dir,
        "--partition",
        "gpu",
        "--time",
        "2:00:00",
        "--gpus",
        "1",
        "--cpus-per-task",
        "3",
        "--mem",
        "8G",
        "--max-parallel",
        "2",
        "--job-name",
        "xsac-dmc",
        "--sbatch-option=--account=lab",
    )
    text = batch.read_text()
    options = dict(re.findall(r"^#SBATCH --([a-z-]+)=(.*)$", text, flags=re.M))
    assert options == {
        "job-name": "xsac-dmc",
        "array": "0-3%2",
        "output": f"{log_dir}/%x_task%a_job%A.log",
        "time": "2:00:00",
        "cpus-per-task": "3",
        "mem": "8G",
        "partition": "gpu",
        "gpus": "1",
        "account": "lab",
    }
    assert text.index("#SBATCH") > 0 and not re.search(
        r"^[^#\n].*\n#SBATCH", text, flags=re.M
    )  # header first

    runs = [(env_id, seed) for seed in SEEDS for env_id in ENV_IDS]  # seed-major task order
    for task_id, (env_id, seed) in enumerate(runs):
        env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task_id), SLURM_CPUS_PER_TASK="3")
        result = subprocess.run(
            ["bash", str(batch)], env=env, capture_output=True, text=True, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        assert f"hello from {env_id} seed {seed}" in result.stdout
        record = json.loads((out / f"{env_id.replace('/', '-')}_{seed}.json").read_text())
        assert record["argv"] == expected_argv(
            env_id, seed, ["--out-dir", str(out), "--tag", "x y"]
        )
        assert Path(record["cwd"]) == ROOT and record["omp"] == "3"
    assert len(list(out.glob("*.json"))) == len(runs)
    beyond = subprocess.run(
        ["bash", str(batch)],
        env=dict(os.environ, SLURM_ARRAY_TASK_ID="4"),
        capture_output=True,
        text=True,
    )
    assert beyond.returncode == 2 and "no run for array task 4" in beyond.stderr

    gres = write_slurm_script(
        load_runner(), script, out, tmp_path / "logs2", "--gres", "gpu:a100:2"
    ).read_text()
    assert (
        "#SBATCH --gres=gpu:a100:2" in gres and "--gpus" not in gres and "--partition" not in gres
    )
    assert "#SBATCH --array=0-3\n" in gres  # no throttle unless asked


# ---------------------------------------------------------------------------------------------------------
# A real single-node Slurm cluster, started by the test.

SLURM_TOOLS = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo"]
PLUGIN_DIRS = ["/usr/lib/*/slurm-wlm", "/usr/lib/slurm", "/usr/lib64/slurm", "/usr/local/lib/slurm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_auth_none() -> bool:
    """Slurm up to 23.02 ships auth/none (no munge needed); later releases dropped it."""
    return any(glob.glob(f"{d}/auth_none.so") for d in PLUGIN_DIRS)


def wait_until(condition, timeout: float, what: str, logs: list[Path]):
    """Poll `condition`; on time-out fail with the tails of the daemons' logs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {p}\n" + (p.read_text()[-2000:] if p.exists() else "(missing)") for p in logs
            )
            pytest.fail(f"{what} (waited {timeout:.0f} s)\n{tails}")
        time.sleep(0.25)


@pytest.fixture(scope="module", params=["auth/none", "auth/munge"])
def slurm_cluster(request, tmp_path_factory):
    """slurmctld + slurmd (+ munged for auth/munge) on this machine, with a config in a temp dir.

    Both authentications are tried: auth/none needs nothing else but left Slurm after 23.02, auth/munge
    is what clusters use. cgroup-free (proctrack/linuxproc, task/none) so it runs inside containers;
    ports picked free. Yields (client environment with SLURM_CONF, daemon logs); shuts every daemon down.
    """
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"Slurm not installed ({', '.join(missing)} missing): "
            "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        pytest.skip(
            "slurmd must run as root to start jobs; run the tests as root for the Slurm test"
        )
    use_munge = request.param == "auth/munge"
    if use_munge and shutil.which("munged") is None:
        pytest.skip("munged not installed: apt-get install munge")
    if not use_munge and not has_auth_none():
        pytest.skip(
            "this Slurm has no auth/none plugin (removed after 23.02); the auth/munge case covers it"
        )

    base = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (base / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    daemons: list[subprocess.Popen] = []
    env = dict(os.environ, SLURM_CONF=str(base / "slurm.conf"))
    logs = [base / "log" / name for name in ("slurmctld.log", "slurmd.log", "munged.log")]

    auth = ["AuthType=auth/none", "CredType=cred/none"]
    if use_munge:
        key = base / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = base / "munge.sock"
        daemons.append(
            subprocess.Popen(
                [
                    "munged",
                    "--foreground",
                    "--force",
                    f"--socket={sock}",
                    f"--key-file={key}",
                    f"--log-file={logs[2]}",
                    f"--pid-file={base / 'munged.pid'}",
                    f"--seed-file={base / 'munged.seed'}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_until(sock.exists, 15, "munged did not create its socket", logs)
        auth = ["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}"]

    (base / "slurm.conf").write_text(
        "\n".join(
            [
                "ClusterName=runsweeptest",
                f"SlurmctldHost={host}(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                *auth,
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                f"StateSaveLocation={base / 'state'}",
                f"SlurmdSpoolDir={base / 'spool'}",
                f"SlurmctldPidFile={base / 'slurmctld.pid'}",
                f"SlurmdPidFile={base / 'slurmd.pid'}",
                f"SlurmctldLogFile={logs[0]}",
                f"SlurmdLogFile={logs[1]}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "MpiDefault=none",
                "SwitchType=switch/none",
                "ReturnToService=2",
                "SchedulerType=sched/backfill",
                f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )

    def node_idle() -> bool:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True
        )
        return result.returncode == 0 and result.stdout.strip() == "idle"

    try:
        for daemon in ("slurmctld", "slurmd"):
            flags = ["-D", "-i"] if daemon == "slurmctld" else ["-D"]
            daemons.append(
                subprocess.Popen(
                    [daemon, *flags, "-f", env["SLURM_CONF"]],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        wait_until(node_idle, 45, "the Slurm node did not come up idle", logs)
        yield env, logs
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        for daemon in reversed(
            daemons
        ):  # slurmd, slurmctld (stopping on `scontrol shutdown`), then munged
            if daemon.args[0] == "munged":
                daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def test_slurm_job_array_runs_the_sweep_on_a_real_cluster(slurm_cluster, tiny, tmp_path):
    """Submit 2 array tasks (one fails on purpose) with --wait: both run, the failure is reported, exit 1."""
    script, out = tiny
    log_dir = tmp_path / "logs"
    slurm_env, daemon_logs = slurm_cluster
    extra = ["--out-dir", str(out), "--tag", "x y", "--fail", "beta-v1:5"]
    try:
        result = subprocess.run(
            [
                sys.executable,
                str(RUNNER),
                "--script",
                str(script),
                "--env-ids",
                *ENV_IDS,
                "--seeds",
                "5",
                "--slurm",
                "--wait",
                "--status-interval",
                "0.5",
                "--partition",
                "debug",
                "--time",
                "00:05:00",
                "--cpus-per-task",
                "1",
                "--mem",
                "100M",
                "--max-parallel",
                "2",
                "--sweep-name",
                "tiny-slurm",
                "--log-dir",
                str(log_dir),
                "--",
                *extra,
            ],
            env=slurm_env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired as error:
        logs = [p for p in daemon_logs + sorted(log_dir.glob("*")) if p.exists()]
        tails = "\n".join(f"--- {p}\n" + p.read_text()[-2000:] for p in logs)
        pytest.fail(f"the Slurm sweep did not finish in 90 s\n{error.stdout}\n{tails}")
    console = result.stdout + result.stderr
    assert result.returncode == 1, console
    job_id = re.search(r"submitted job array (\d+)", console).group(1)
    assert str(log_dir / "tiny-slurm.sbatch") in console

    # the runner's report ...
    summary = console[console.index(f"job {job_id} done") :]
    assert "1 ok, 1 failed" in summary
    failure = [line for line in summary.splitlines() if line.strip().startswith("FAILED")]
    assert len(failure) == 1 and "beta-v1 seed 5 (task 1): FAILED, exit code 7:0" in failure[0]
    assert str(log_dir / f"tiny-slurm_task1_job{job_id}.log") in failure[0]
    assert "last line: deliberate failure" in summary
    # ... agrees with the controller's records
    jobs = subprocess.run(
        ["scontrol", "show", "job", job_id],
        env=slurm_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    task_states = re.findall(
        r"ArrayTaskId=(\d+) .*?JobState=(\S+) .*?ExitCode=(\S+)", jobs, flags=re.S
    )
    assert sorted(task_states) == [("0", "COMPLETED", "0:0"), ("1", "FAILED", "7:0")], jobs
    record = json.loads((out / "suite-alpha-v0_5.json").read_text())
    assert record["argv"] == expected_argv("suite/alpha-v0", 5, extra)
    assert Path(record["cwd"]) == ROOT and record["omp"] == "1"
    assert not (out / "beta-v1_5.json").exists()
    for task_id, env_id in enumerate(ENV_IDS):
        log = (log_dir / f"tiny-slurm_task{task_id}_job{job_id}.log").read_text()
        assert f"hello from {env_id} seed 5" in log


def squeue_states(job: str, env: dict) -> list[str]:
    done = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True
    )
    return done.stdout.split()


@pytest.mark.parametrize("slurm_cluster", ["auth/munge"], indirect=True)  # one cluster is enough
def test_slurm_requeue_resumes_the_task_from_its_checkpoint(slurm_cluster, tmp_path):
    """--requeue: an X-TD3 task requeued mid-run (`scontrol requeue`, as a preemption) checkpoints on
    Slurm's SIGTERM, starts again, resumes from its run folder's checkpoint and finishes with the
    full number of env steps, in one run folder."""
    slurm_env, daemon_logs = slurm_cluster
    log_dir, runs = tmp_path / "logs", tmp_path / "runs"
    total = 3000
    command = [sys.executable, str(RUNNER), "--script", "xtd3_continuous.py"]
    command += ["--env-ids", "Pendulum-v1", "--seeds", "3", "--slurm", "--requeue"]
    command += ["--partition", "debug", "--time", "00:20:00", "--cpus-per-task", "1"]
    command += ["--mem", "900M", "--sweep-name", "requeue", "--log-dir", str(log_dir), "--"]
    command += ["--total-timesteps", str(total), "--learning-starts", "200", "--hidden-dim", "16"]
    command += ["--batch-size", "16", "--log-freq", "200", "--eval-freq", "0"]
    command += ["--eval-episodes", "1", "--checkpoint-freq", "300", "--runs-dir", str(runs)]
    command += ["--no-cuda", "--exp-name", "xtd3"]
    submitted = subprocess.run(command, env=slurm_env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    array_job = re.search(r"submitted job array (\d+)", submitted.stdout).group(1)
    task = f"{array_job}_0"
    script = (log_dir / "requeue.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@120" in script
    (run_dir,) = re.findall(r"run_dir=(\S+) ;;", script)
    assert run_dir.startswith(f"{runs}/Pendulum-v1__xtd3__3__")
    logs = [*daemon_logs, log_dir]

    def first_checkpoint() -> bool:
        return os.path.exists(f"{run_dir}/checkpoint.pt") and "RUNNING" in squeue_states(
            task, slurm_env
        )

    wait_until(first_checkpoint, 120, "the task wrote no checkpoint while running", logs)
    requeued = subprocess.run(
        ["scontrol", "requeue", task], env=slurm_env, capture_output=True, text=True
    )
    assert requeued.returncode == 0, requeued.stderr
    # Once pending again, a requeued job waits out a begin time (minutes): let it start at once.
    wait_until(lambda: "PENDING" in squeue_states(task, slurm_env), 60, "no requeue", logs)
    subprocess.run(
        ["scontrol", "update", f"jobid={task}", "StartTime=now"], env=slurm_env, capture_output=True
    )
    wait_until(lambda: not squeue_states(task, slurm_env), 240, "the task did not finish", logs)

    (log_path,) = log_dir.glob("requeue_task0_job*.log")
    log = log_path.read_text()
    assert "xtd3_continuous: stopped by a signal at step " in log, log[-3000:]
    resumed = re.findall(r"xtd3_continuous: resumed (\S+) at step (\d+)", log)
    assert len(resumed) == 1 and 0 < int(resumed[0][1]) < total, log[-3000:]
    assert os.path.samefile(resumed[0][0], run_dir)
    assert "xtd3_continuous: done, final eval return" in log and f"run folder {run_dir}" in log
    assert [p.name for p in runs.iterdir()] == [os.path.basename(run_dir)]  # one run folder
    checkpoint = torch_load(f"{run_dir}/checkpoint.pt")
    assert checkpoint["step"] == total
    assert checkpoint["state"]["num_updates"] == total - 200 + 1


def torch_load(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)
