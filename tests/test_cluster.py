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
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from local_cluster import LocalCluster
from radis.train.export import consolidated_state_dict
from radis.train.metrics import read_metrics
from test_train_dist import _env, _numerics, run_a, work  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.cluster, pytest.mark.distributed]

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


def _rank_environments(cluster: LocalCluster, stop: threading.Event, seen: dict) -> None:
    """While a run lasts: for each host, the environment of a `radis.cli train` process
    found in it (its UTS namespace is the host's), read from /proc of this machine."""
    hosts = {_uts(cluster.host_pid(h)): h for h in cluster.hosts}
    while not stop.is_set() and len(seen) < len(hosts):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"radis.cli" not in cmdline or b"train" not in cmdline:
                    continue
                host = hosts.get(_uts(int(pid)))
                if host and host not in seen:
                    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    seen[host] = dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)
            except OSError:
                continue
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


def test_slurm_schedules_torchrun_on_two_hosts(cluster, work, run_a, tmp_path):
    """sbatch launch/slurm.sbatch, 2 nodes: the real slurmctld runs the batch script on n1,
    srun starts one torchrun per node, c10d rendezvous on n1's name; the job COMPLETED and
    its numbers equal run A's."""
    out, job_out = tmp_path / "slurm", tmp_path / "job-%j.out"
    env = _env(RADIS_CPU="1", NPROC="1", **cluster.slurm_env)
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                           f"--output={job_out}", "launch/slurm.sbatch", str(work["config"]),
                           f"train.output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    state = _wait_job(cluster, job, timeout=300)
    log = Path(str(job_out).replace("%j", job)).read_text()
    assert state == "COMPLETED", log[-6000:]
    assert _hosts_line(cluster) in log, log[-6000:]
    _assert_same_as_run_a(out, run_a)


def _wait_job(cluster: LocalCluster, job: str, timeout: float) -> str:
    """The job's final state from the controller's job-completion log (no accounting daemon)."""
    deadline = time.monotonic() + timeout
    done = cluster.root / "slurm" / "jobcomp.log"
    while time.monotonic() < deadline:
        for line in done.read_text().splitlines() if done.exists() else []:
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("JobId") == job:
                return fields["JobState"]
        time.sleep(1)
    subprocess.run(["scancel", job], env={**os.environ, **cluster.slurm_env}, check=False)
    raise AssertionError(f"job {job} not finished after {timeout} s")


def test_torchrun_on_each_host_with_a_rendezvous_on_n1(cluster, work, run_a, tmp_path):
    """launch/torchrun.sh started on each host (node ranks 0 and 1, static rendezvous on
    n1's address), as a user without a scheduler does it: the numbers equal run A's."""
    out = tmp_path / "torchrun"
    procs = []
    for rank, host in enumerate(cluster.hosts):
        env = _env(RADIS_CPU="1", NNODES="2", NODE_RANK=str(rank), NPROC="1", MASTER_ADDR=cluster.address("n1"),
                   MASTER_PORT="29500")
        procs.append(cluster.popen(host, ["bash", "launch/torchrun.sh", str(work["config"]), f"train.output_dir={out}"],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    assert _hosts_line(cluster) in logs[0], logs[0][-4000:]
    _assert_same_as_run_a(out, run_a)
