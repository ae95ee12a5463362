"""The launchers on a real two-host cluster (tests/local_cluster.py: network namespaces,
sshd, pdsh, Slurm), one CPU rank per host, the tiny Llama of test_train_dist.

Each run is compared with run A of test_train_dist (the same config, 2 ranks on one
host through launch/single_node.sh): the same world size on two hosts must give the
same numbers, bit for bit.

Skipped, with the reason, where the cluster cannot be built (not root, no `ip netns`, the
Debian packages absent: `.ci/run` installs them).
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import test_train_dist
import torch
from local_cluster import LocalCluster
from test_train_dist import _env, _numerics

from radis.train.export import consolidated_state_dict
from radis.train.metrics import read_metrics

pytestmark = [pytest.mark.cluster, pytest.mark.distributed]
# test_train_dist's tiny Llama and its run A (2 ranks on one host), shared through build_once
work = test_train_dist.work
run_a = test_train_dist.run_a

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = LocalCluster.missing()
    if reason:
        pytest.skip(reason)
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), hosts=2, cpus_per_host=os.cpu_count())
    try:
        yield c.up()
    finally:
        c.down()


def _uts(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def _processes_with(text: str) -> list[int]:
    """PIDs (on every host: their PID namespaces are inside this one) whose command line holds `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def _rank_environments(cluster: LocalCluster, stop: threading.Event, seen: dict) -> None:
    """While a run lasts: for each host, the environment of a `radis.cli train` process
    found in it (its UTS namespace is the host's), read from /proc of this machine."""
    hosts = {_uts(cluster.host_pid(h)): h for h in cluster.hosts}
    while not stop.is_set() and len(seen) < len(hosts):
        for pid in _processes_with("radis.cli\0train\0"):
            host = hosts.get(_uts(pid))
            if host and host not in seen:
                try:
                    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:  # gone meanwhile
                    continue
                seen[host] = dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)
        time.sleep(0.2)


def _assert_same_as_run_a(out: Path, run_a) -> None:
    """The metrics (timings aside) and the final weights of run A, bit for bit."""
    assert _numerics(read_metrics(out / "metrics.jsonl", kind=None)) == \
        _numerics(read_metrics(run_a[0] / "metrics.jsonl", kind=None))
    ours = consolidated_state_dict(out / "checkpoints", "global_step10")
    theirs = consolidated_state_dict(run_a[0] / "checkpoints", "global_step10")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def _report(**fields) -> None:
    """One measured row: on stdout (pytest -s) and, for benchmarks/bench_cluster.py, appended
    to the JSON Lines file RADIS_CLUSTER_REPORT names."""
    import json

    print("cluster:", json.dumps(fields))
    if os.environ.get("RADIS_CLUSTER_REPORT"):
        with open(os.environ["RADIS_CLUSTER_REPORT"], "a", encoding="utf-8") as f:
            f.write(json.dumps(fields) + "\n")


def _first_step_s(out: Path, started: float) -> float:
    """Seconds from `started` (time.time()) to the run's first optimizer step."""
    return min(r["time"] for r in read_metrics(out / "metrics.jsonl")) - started


def _hosts_line(cluster: LocalCluster) -> str:
    return f"hosts: n1 {cluster.address('n1')} (rank 0), n2 {cluster.address('n2')} (rank 1)"


def test_deepspeed_launcher_trains_across_two_hosts(cluster, work, run_a, tmp_path):
    """launch/multi_node.sh started on n1: DeepSpeed's runner reaches both hosts over pdsh
    and ssh, one rank on each; the run's environment (CPU mode, offline hub, RADIS_*)
    arrives in the rank on n2 through the env file; the numbers equal run A's."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    out, mark = tmp_path / "ds", secrets.token_hex(4)
    stop, seen = threading.Event(), {}
    watcher = threading.Thread(target=_rank_environments, args=(cluster, stop, seen), daemon=True)
    watcher.start()
    started = time.time()
    try:
        proc = cluster.run("n1", ["bash", "launch/multi_node.sh", str(work["config"]), f"train.output_dir={out}"],
                           cwd=ROOT, env=_env(RADIS_CPU="1", HOSTFILE=str(hostfile), RADIS_TEST_MARK=mark),
                           capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        watcher.join()
    log = f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    assert _hosts_line(cluster) in proc.stdout, log
    assert set(seen) == {"n1", "n2"}, seen.keys()
    for host, env in seen.items():
        for name, value in {"RADIS_TEST_MARK": mark, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                            "HF_HUB_OFFLINE": "1"}.items():
            assert env.get(name) == value, (host, name, env.get(name))
    _assert_same_as_run_a(out, run_a)
    # export on the other host, from the shared file system
    hf = tmp_path / "hf"
    proc = cluster.run("n2", [sys.executable, "-m", "radis.cli", "export", "--checkpoint", str(out / "checkpoints"),
                              "--out", str(hf)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file
    trained = {k.removeprefix("model."): v for k, v in consolidated_state_dict(out / "checkpoints", "global_step10").items()}
    exported = load_file(hf / "model.safetensors")
    assert exported and set(exported) <= set(trained)
    for key, value in exported.items():
        assert torch.equal(value, trained[key]), key
    _report(launcher="deepspeed (pdsh)", test="train", setup_s=cluster.state["setup_s"],
            first_step_s=round(_first_step_s(out, started), 1), steps=10, bit_exact=True)


def test_slurm_schedules_torchrun_on_two_hosts(cluster, work, run_a, tmp_path):
    """sbatch launch/slurm.sbatch, 2 nodes: the real slurmctld runs the batch script on n1,
    srun starts one torchrun per node, c10d rendezvous on n1's name; the job COMPLETED and
    its numbers equal run A's."""
    out, job_out = tmp_path / "slurm", tmp_path / "job-%j.out"
    env = _env(RADIS_CPU="1", NPROC="1", **cluster.slurm_env)
    started = time.time()
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                           f"--output={job_out}", "launch/slurm.sbatch", str(work["config"]),
                           f"train.output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    state = _wait_job(cluster, job, timeout=300)
    log = Path(str(job_out).replace("%j", job)).read_text()
    assert state == "COMPLETED", log[-6000:]
    assert _hosts_line(cluster) in log, log[-6000:]
    _assert_same_as_run_a(out, run_a)
    _report(launcher="slurm", test="train", setup_s=cluster.state["setup_s"],
            first_step_s=round(_first_step_s(out, started), 1), steps=10, bit_exact=True)


def _job_ends(cluster: LocalCluster, job: str) -> list[str]:
    """Every end of the job in the controller's job-completion log (no accounting daemon
    here): one state per run, e.g. ['NODE_FAIL', 'COMPLETED'] for a job requeued once."""
    done = cluster.root / "slurm" / "jobcomp.log"
    ends = []
    for line in done.read_text().splitlines() if done.exists() else []:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("JobId") == job:
            ends.append(fields["JobState"])
    return ends


def _wait_job(cluster: LocalCluster, job: str, timeout: float, runs: int = 1) -> str:
    """The job's state at the end of its `runs`-th run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ends = _job_ends(cluster, job)
        if len(ends) >= runs:
            return ends[runs - 1]
        time.sleep(0.5)
    subprocess.run(["scancel", job], env={**os.environ, **cluster.slurm_env}, check=False)
    raise AssertionError(f"job {job}: {runs} run(s) not ended after {timeout} s (ends so far: {_job_ends(cluster, job)})")


def _torchrun_on_each_host(cluster: LocalCluster, work, out: Path, logs: list[Path]) -> list[subprocess.Popen]:
    """launch/torchrun.sh on n1 and n2 as node ranks 0 and 1, one rank each, a static
    rendezvous on n1's address; output appended to logs[0] / logs[1]."""
    procs = []
    for rank, host in enumerate(cluster.hosts):
        env = _env(RADIS_CPU="1", NNODES="2", NODE_RANK=str(rank), NPROC="1", MASTER_ADDR=cluster.address("n1"),
                   MASTER_PORT="29500")
        with open(logs[rank], "a") as log:
            procs.append(cluster.popen(host, ["bash", "launch/torchrun.sh", str(work["config"]),
                                              f"train.output_dir={out}"],
                                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def test_torchrun_on_each_host_with_a_rendezvous_on_n1(cluster, work, run_a, tmp_path):
    """launch/torchrun.sh started on each host, as a user without a scheduler does it: the
    numbers equal run A's."""
    out, logs = tmp_path / "torchrun", [tmp_path / "n1.log", tmp_path / "n2.log"]
    started = time.time()
    procs = _torchrun_on_each_host(cluster, work, out, logs)
    rcs = [p.wait(timeout=300) for p in procs]
    assert rcs == [0, 0], logs[0].read_text()[-4000:] + logs[1].read_text()[-4000:]
    assert _hosts_line(cluster) in logs[0].read_text(), logs[0].read_text()[-4000:]
    _assert_same_as_run_a(out, run_a)
    _report(launcher="torchrun", test="train", setup_s=cluster.state["setup_s"],
            first_step_s=round(_first_step_s(out, started), 1), steps=10, bit_exact=True)


@pytest.mark.parametrize("fault", ["crash", "partition"])
def test_torchrun_lost_host_then_resume_bit_exact(cluster, work, run_a, tmp_path, fault):
    """n2 crashes or is cut off after step k under torchrun: n1's rank stops naming rank 1
    and the checkpoint, n1's torchrun exits non-zero; both started again once n2 is back
    resume and end with run A's weights."""
    import random

    k = random.Random(f"{CRASH_SEED}-torchrun-{fault}").randint(5, 7)
    out, logs = tmp_path / "torchrun", [tmp_path / "n1.log", tmp_path / "n2.log"]
    procs = _torchrun_on_each_host(cluster, work, out, logs)
    try:
        _wait_step(out, k, procs[0], checkpoint="global_step5")
        t0 = time.monotonic()
        cluster.crash("n2") if fault == "crash" else cluster.partition("n2")
        rc = procs[0].wait(timeout=120)
        launcher_s = time.monotonic() - t0
        survivor_s = _until_gone(f"train.output_dir={out}", t0, cluster=cluster, host="n1")
        # behind a cut, n2's torchrun and rank stop by their own timeouts
        cut_off_s = _until_gone(f"train.output_dir={out}", t0) if fault == "partition" else None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        cluster.restart("n2") if fault == "crash" else cluster.partition("n2", cut=False)
    text = logs[0].read_text()
    assert rc != 0 and launcher_s < 60 and survivor_s < 30 + 10, (rc, launcher_s, survivor_s, text[-3000:])
    assert "lost rank 1" in text and f"the last complete checkpoint is {out / 'checkpoints' / 'global_step5'}" in text, \
        text[-3000:]
    t1 = time.monotonic()
    procs = _torchrun_on_each_host(cluster, work, out, logs)
    assert [p.wait(timeout=300) for p in procs] == [0, 0], logs[0].read_text()[-3000:]
    resume_s = time.monotonic() - t1
    assert "resumed at step 5 from global_step5" in logs[0].read_text()
    _assert_same_as_run_a(out, run_a)
    assert cut_off_s is None or cut_off_s < 30 + 30, cut_off_s
    _report(launcher="torchrun", test=fault, after_step=k, survivor_exit_s=round(survivor_s, 1),
            launcher_exit_s=round(launcher_s, 1), launcher_rc=rc,
            cut_off_rank_exit_s=None if cut_off_s is None else round(cut_off_s, 1), resume_s=round(resume_s, 1),
            bit_exact=True)


def _child(pid: int) -> int:
    """The one child of `pid` (what nsenter started inside the host)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError(f"process {pid} started nothing")




def _wait_step(out: Path, step: int, proc: subprocess.Popen | None, timeout: float = 180, checkpoint: str | None = None
               ) -> None:
    """Until the run has logged `step` (and, if given, `latest` names `checkpoint`)."""
    from radis.train.checkpoint import latest_tag

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(r.get("step", 0) >= step for r in read_metrics(out / "metrics.jsonl", kind=None)) and \
                    (checkpoint is None or latest_tag(out / "checkpoints") == checkpoint):
                return
        except (OSError, ValueError):  # not there yet, or a line half written
            pass
        assert proc is None or proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        time.sleep(0.2)
    raise AssertionError(f"{out}: no step {step} after {timeout} s")


def test_sigterm_to_multi_node_stops_its_own_ranks_and_no_other_job(cluster, work, tmp_path):
    """A scheduler's SIGTERM to launch/multi_node.sh while a second, unrelated DeepSpeed job
    of the same venv runs on the same hosts: this job's launchers and ranks are gone from
    both hosts within seconds, the other job trains on to its end (DeepSpeed's own clean-up,
    `pkill -f "<python> -u -m deepspeed.launcher.launch"` on every host, would kill both)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    jobs = {}
    for name, port, steps in (("other", "29600", "30"), ("stopped", "29500", "1000")):
        out = tmp_path / name
        with open(tmp_path / f"{name}.log", "w") as log:
            jobs[name] = cluster.popen("n1", ["bash", "launch/multi_node.sh", str(work["config"]),
                                              f"train.output_dir={out}", f"train.max_steps={steps}",
                                              "train.eval_every=0", "train.save_every=100"],
                                       cwd=ROOT, env=_env(RADIS_CPU="1", HOSTFILE=str(hostfile), MASTER_PORT=port),
                                       stdout=log, stderr=subprocess.STDOUT)
    try:
        for name, job in jobs.items():
            _wait_step(tmp_path / name, 1, job)
        assert _processes_with(f"train.output_dir={tmp_path / 'other'}")
        t0 = time.monotonic()
        os.kill(_child(jobs["stopped"].pid), signal.SIGTERM)  # the script itself, not nsenter
        rc = jobs["stopped"].wait(timeout=60)
        stopped_s = time.monotonic() - t0
        while _processes_with(f"train.output_dir={tmp_path / 'stopped'}") and time.monotonic() - t0 < 30:
            time.sleep(0.2)
        gone_s = time.monotonic() - t0
        log = (tmp_path / "stopped.log").read_text()
        assert rc == 143, log[-3000:]
        assert "stopping this job (master n1:29500) on n1,n2" in log, log[-3000:]
        assert not _processes_with(f"train.output_dir={tmp_path / 'stopped'}"), log[-3000:]
        assert stopped_s < 30 and gone_s < 30, (stopped_s, gone_s)
        assert jobs["other"].wait(timeout=300) == 0, (tmp_path / "other.log").read_text()[-3000:]
        assert max(r["step"] for r in read_metrics(tmp_path / "other" / "metrics.jsonl")) == 30
        _report(launcher="deepspeed (pdsh)", test="SIGTERM beside another job", launcher_exit_s=round(stopped_s, 1),
                ranks_gone_s=round(gone_s, 1), launcher_rc=rc, other_job="completed")
    finally:
        for p in jobs.values():
            if p.poll() is None:
                os.kill(_child(p.pid), signal.SIGTERM)
                p.wait(timeout=60)


CRASH_SEED = 26


def _multi_node(cluster: LocalCluster, work, out: Path, hostfile: Path, log: Path, **env: str) -> subprocess.Popen:
    with open(log, "a") as f:
        return cluster.popen("n1", ["bash", "launch/multi_node.sh", str(work["config"]), f"train.output_dir={out}"],
                             cwd=ROOT, env=_env(RADIS_CPU="1", HOSTFILE=str(hostfile), **env), stdout=f,
                             stderr=subprocess.STDOUT)


def _until_gone(text: str, since: float, limit: float = 120, cluster: LocalCluster | None = None,
                host: str | None = None) -> float:
    """Seconds from `since` until no process (on `host`, or on any) has `text` in its command line."""
    def left() -> list[int]:
        pids = _processes_with(text)
        if host is None:
            return pids
        uts = _uts(cluster.host_pid(host))
        return [p for p in pids if _uts(p) == uts]

    while left() and time.monotonic() - since < limit:
        time.sleep(0.1)
    return time.monotonic() - since


@pytest.mark.parametrize("fault", ["crash", "partition"])
def test_deepspeed_launcher_survives_a_lost_host_and_resumes_bit_exact(cluster, work, run_a, tmp_path, fault):
    """Host n2 (rank 1) crashes (its PID 1 killed: every process in it dies at once) or is
    cut off (its link down) after step k (drawn from a seed): the rank on n1 stops within
    train.dist_timeout_s (30 s) naming rank 1 and the last complete checkpoint, the
    launcher exits non-zero within 60 s (no hang of pdsh: ssh keep-alives), and the same
    command, started again once n2 is back, resumes and ends with run A's weights."""
    import random

    k = random.Random(f"{CRASH_SEED}-{fault}").randint(5, 7)  # after the checkpoint of step 5
    hostfile, out, log = tmp_path / "hostfile", tmp_path / "run", tmp_path / "launcher.log"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    proc = _multi_node(cluster, work, out, hostfile, log)
    try:
        _wait_step(out, k, proc, checkpoint="global_step5")
        t0 = time.monotonic()
        cluster.crash("n2") if fault == "crash" else cluster.partition("n2")
        rc = proc.wait(timeout=120)
        launcher_s = time.monotonic() - t0
        survivor_s = _until_gone(f"train.output_dir={out}", t0, cluster=cluster, host="n1")
    finally:
        if proc.poll() is None:
            os.kill(_child(proc.pid), signal.SIGTERM)
        if fault == "crash":
            cluster.restart("n2")
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert launcher_s < 60 and survivor_s < 30 + 10, (launcher_s, survivor_s, text[-3000:])
    assert "radis train: error: rank 0: a collective failed" in text and "lost rank 1" in text, text[-3000:]
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'global_step5'}" in text, text[-3000:]
    if fault == "partition":
        # rank 1 lived on behind the cut: it stops by its own collective timeout (30 s), then
        # gives up on the unreachable store (radis.train.heartbeat.STORE_REPLY_S) and exits
        cut_off_s = _until_gone(f"train.output_dir={out}", t0)
        assert cut_off_s < 30 + 30, cut_off_s
    else:
        cut_off_s = None

    if fault == "partition":
        cluster.partition("n2", cut=False)
    t1 = time.monotonic()
    proc = _multi_node(cluster, work, out, hostfile, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    resume_s = time.monotonic() - t1
    assert "resumed at step 5 from global_step5" in log.read_text()
    _assert_same_as_run_a(out, run_a)
    _report(launcher="deepspeed (pdsh)", test=fault, after_step=k, survivor_exit_s=round(survivor_s, 1),
            launcher_exit_s=round(launcher_s, 1), launcher_rc=rc,
            cut_off_rank_exit_s=None if cut_off_s is None else round(cut_off_s, 1), resume_s=round(resume_s, 1),
            bit_exact=True)


def test_slurm_job_whose_node_crashes_is_requeued_and_resumes_bit_exact(cluster, work, run_a, tmp_path):
    """sbatch --requeue: n2 crashes after step k; the rank on n1 stops naming rank 1 and the
    checkpoint, Slurm declares the node down (SlurmdTimeout, 20 s here) and ends that run
    of the job NODE_FAIL, requeueing it; once n2 is back the job runs again, resumes from
    global_step5, COMPLETES, and ends with run A's weights."""
    import random

    k = random.Random(f"{CRASH_SEED}-slurm").randint(5, 7)
    out, job_out = tmp_path / "slurm", tmp_path / "job.out"
    env = _env(RADIS_CPU="1", NPROC="1", **cluster.slurm_env)
    proc = subprocess.run(["sbatch", "--parsable", "--requeue", "--open-mode=append", "--nodes=2", "--gpus-per-node=0",
                           "--cpus-per-task=1", f"--output={job_out}", "launch/slurm.sbatch", str(work["config"]),
                           f"train.output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 180
        while not (job_out.exists() and "step 5: saved" in job_out.read_text()):
            assert time.monotonic() < deadline and not _job_ends(cluster, job), job_out.read_text()[-3000:]
            time.sleep(0.2)
        _wait_step(out, k, None, checkpoint="global_step5")
        t0 = time.monotonic()
        cluster.crash("n2")
        survivor_s = _until_gone(f"train.output_dir={out}", t0, cluster=cluster, host="n1")
        state = _wait_job(cluster, job, timeout=120)
        ended_s = time.monotonic() - t0
    finally:
        cluster.restart("n2")
    log = job_out.read_text()
    assert state == "NODE_FAIL", (state, log[-3000:])
    assert "lost rank 1" in log and f"the last complete checkpoint is {out / 'checkpoints' / 'global_step5'}" in log, \
        log[-3000:]
    assert survivor_s < 30 + 10, survivor_s
    # Slurm holds a requeued job for a while (its begin time; measured: 145 s) before it may
    # start again. Moving it on at once (`scontrol update JobId=.. StartTime=now`) made its
    # second run fail here: srun saw 1 of its 2 nodes and could not create its step.
    t1 = time.monotonic()
    assert _wait_job(cluster, job, timeout=400, runs=2) == "COMPLETED", job_out.read_text()[-3000:]
    resume_s = time.monotonic() - t1
    assert "resumed at step 5 from global_step5" in job_out.read_text()
    _assert_same_as_run_a(out, run_a)
    _report(launcher="slurm", test="crash, --requeue", after_step=k, survivor_exit_s=round(survivor_s, 1),
            launcher_exit_s=round(ended_s, 1), launcher_rc=state, resume_s=round(resume_s, 1), bit_exact=True)


def test_generation_through_the_deepspeed_launcher_on_two_hosts(cluster, tmp_path):
    """RADIS_COMMAND=generate launch/multi_node.sh: rationales written by one rank on each
    host, merged, equal to the same generation in one process."""
    from test_generation import make_tiny_generator
    from test_generation_resume import (
        MERGED,
        _records,
        _reference_run,
        write_config,
        write_pairs,
    )

    gen, data = make_tiny_generator(tmp_path / "gen"), tmp_path / "pairs.jsonl"
    write_pairs(data, 12)
    settings = {"max_new_tokens": 8, "min_rationale_tokens": 4, "batch_size": 4}
    config = write_config(tmp_path, gen, data, tmp_path / "two_hosts", **settings)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    proc = cluster.run("n1", ["bash", "launch/multi_node.sh", str(config)], cwd=ROOT,
                       env=_env(RADIS_CPU="1", HOSTFILE=str(hostfile), RADIS_COMMAND="generate"),
                       capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "n1: " in proc.stdout and "n2: " in proc.stdout  # pdsh's prefixes: a rank on each host
    assert _records(tmp_path / "two_hosts" / MERGED) == _reference_run(tmp_path, gen, data, "one_rank", **settings)


def test_evaluation_through_slurm_on_two_hosts(cluster, tmp_path):
    """RADIS_COMMAND=evaluate sbatch launch/slurm.sbatch, 2 nodes: translations and their
    scores equal one process's."""
    import json

    from test_evaluate import _save_tiny

    from radis.config import load_config
    from radis.evaluate.command import evaluate

    base = _save_tiny(tmp_path / "base", seed=0)
    tuned = _save_tiny(tmp_path / "tuned", seed=1, perturb_from=base)
    test_file = tmp_path / "test.de-en.jsonl"
    test_file.write_text("".join(json.dumps({"translation": {"de": f"Satz Nummer {i}.", "en": f"Sentence number {i}."}})
                                 + "\n" for i in range(7)), encoding="utf-8")
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {{name_or_path: '{base}'}}\n"
                      f"eval:\n  models: ['original={base}', 'tuned={tuned}']\n  max_new_tokens: 5\n"
                      f"  retention_max_new_tokens: 5\n  retention_limit: 3\n  safety_limit: 3\n  safety_max_new_tokens: 5\n"
                      f"  batch_size: 2\n"
                      f"  test: [{{path: '{test_file}', src_lang: de, tgt_lang: en}}]\n", encoding="utf-8")
    job_out = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                           f"--output={job_out}", "launch/slurm.sbatch", str(config),
                           f"eval.output_dir={tmp_path / 'two_hosts'}"], cwd=ROOT,
                          env=_env(RADIS_CPU="1", NPROC="1", RADIS_COMMAND="evaluate", **cluster.slurm_env),
                          capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    state = _wait_job(cluster, proc.stdout.strip().split(";")[0], timeout=300)
    assert state == "COMPLETED", job_out.read_text()[-4000:]
    evaluate(load_config(config, [f"eval.output_dir={tmp_path / 'one'}"]))
    for name in ("original", "tuned"):
        two = json.loads((tmp_path / "two_hosts" / name / "translations.json").read_text(encoding="utf-8"))
        one = json.loads((tmp_path / "one" / name / "translations.json").read_text(encoding="utf-8"))
        assert [t["raw"] for t in two] == [t["raw"] for t in one]
    assert [m["chrf_cut"] for m in json.loads((tmp_path / "two_hosts" / "summary.json").read_text())["models"]] == \
        [m["chrf_cut"] for m in json.loads((tmp_path / "one" / "summary.json").read_text())["models"]]
