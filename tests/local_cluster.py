"""A two-host cluster on one Linux machine, for the launcher tests: network namespaces,
sshd, pdsh, munge and Slurm, all real.

    python tests/local_cluster.py up /tmp/radis-cluster      # prints the hosts; state in that folder
    python tests/local_cluster.py run /tmp/radis-cluster n1 -- hostname -I
    python tests/local_cluster.py down /tmp/radis-cluster    # idempotent: removes all it made

Layout (one bridge in the root namespace; nothing routes out of the subnet):

    root namespace  10.213.K.254  bridge rcbTAG, munged, slurmctld (sbatch/squeue run here)
        |-- veth rcTAG-1 ==== eth0 10.213.K.1  host n1: net + uts + mount + pid namespaces,
        |                                       sshd, slurmd -N n1
        `-- veth rcTAG-2 ==== eth0 10.213.K.2  host n2: the same

Each host is one process tree: PID 1 of its own PID namespace is a small bash loop (it
reaps orphans); sshd and slurmd run under it. Killing that PID 1 (`crash`) makes the
kernel kill everything in the host, as a power cut would; `partition` takes its link
down. The file system is shared, so the checkout and its venv are at the same path on
every host, as the launchers require; inside each host's own mount namespace /etc/hosts
(n1, n2 and the controller's name) and /root/.ssh (a key pair, `StrictHostKeyChecking no`)
are bind-mounted from the state folder, so nothing under /etc or ~ is changed.

Daemons are started with `nsenter` into the network namespace, not `ip netns exec`: the
latter remounts /sys, which hides the cgroup file system, and slurmd then refuses to start.

Needs root, iproute2's `ip netns`, nsenter/unshare, and the Debian packages
openssh-server, pdsh, munge, slurmd, slurmctld, slurm-client. `LocalCluster.missing()`
says what is absent; the tests skip with that reason.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TOOLS = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "sshd": "openssh-server",
         "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pdsh": "pdsh", "munged": "munge",
         "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "scontrol": "slurm-client"}
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
STATE = "cluster.json"


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the cluster (not root, a tool missing); the message says which."""


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next((f"{d}/{tool}" for d in SBIN if os.access(f"{d}/{tool}", os.X_OK)), None)


def _sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _free_subnet() -> int:
    """A K for 10.213.K.0/24 that no interface of this machine uses (several clusters may coexist)."""
    used = _sh("ip", "-o", "-4", "addr", "show").stdout
    for k in [secrets.randbelow(250) + 1 for _ in range(50)]:
        if f"10.213.{k}." not in used:
            return k
    raise ClusterUnavailable("no free 10.213.K.0/24 subnet")


def _short_hostname() -> str:
    """This machine's name as `hostname -s` gives it: slurmctld only runs where it matches SlurmctldHost."""
    return socket.gethostname().split(".")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`hosts` hosts n1..nN; every path and name it makes is recorded in <root>/cluster.json
    as it is made, so that `down` (also from another process) removes exactly those."""

    def __init__(self, root: str | os.PathLike, hosts: int = 2, cpus_per_host: int | None = None):
        self.root = Path(root).resolve()
        self.n_hosts = hosts
        self.cpus = cpus_per_host or os.cpu_count() or 1
        self.state: dict = {}
        if (self.root / STATE).is_file():
            self.state = json.loads((self.root / STATE).read_text())

    # ------------------------------------------------------------------ preconditions

    @staticmethod
    def missing() -> str | None:
        """Why the cluster cannot run here, or None."""
        if sys.platform != "linux":
            return "the local cluster needs Linux network namespaces"
        if os.geteuid() != 0:
            return "the local cluster needs root (network namespaces, sshd, slurmd)"
        absent = sorted({pkg for tool, pkg in TOOLS.items() if _which(tool) is None})
        if absent:
            return f"the local cluster needs the Debian packages: {' '.join(absent)} (apt-get install them)"
        probe = f"radis-probe-{os.getpid()}"
        proc = _sh("ip", "netns", "add", probe, check=False)
        if proc.returncode != 0:
            return f"`ip netns add` fails here: {proc.stderr.strip()}"
        _sh("ip", "netns", "delete", probe, check=False)
        return None

    # ------------------------------------------------------------------ state

    def _save(self) -> None:
        tmp = self.root / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.root / STATE)

    @property
    def hosts(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.state.get("hosts", self.n_hosts) + 1)]

    def address(self, host: str) -> str:
        return f"10.213.{self.state['subnet']}.{int(host[1:])}"

    @property
    def controller_address(self) -> str:
        return f"10.213.{self.state['subnet']}.254"

    def veth(self, host: str) -> str:
        return f"rc{self.state['tag']}-{host[1:]}"

    def netns(self, host: str) -> str:
        return f"radis-{self.state['tag']}-{host}"

    def host_pid(self, host: str) -> int:
        return self.state["init"][host]

    @property
    def slurm_env(self) -> dict[str, str]:
        """What sbatch/squeue/scontrol need to find this cluster (add to a job's environment)."""
        return {"SLURM_CONF": str(self.root / "slurm.conf")}

    # ------------------------------------------------------------------ up

    def up(self, slurm: bool = True) -> LocalCluster:
        reason = self.missing()
        if reason:
            raise ClusterUnavailable(reason)
        if self.state.get("up"):
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # sshd and munged check the folders above their files
        t0 = time.monotonic()
        self.state = {"tag": secrets.token_hex(2), "subnet": _free_subnet(), "hosts": self.n_hosts,
                      "netns": [], "links": [], "init": {}, "daemons": {}, "made_ssh_dir": False}
        self._save()
        try:
            self._network()
            self._files()
            for host in self.hosts:
                self._start_host(host)
            self._wait_ssh()
            if slurm:
                self._slurm()
        except BaseException:
            self.down()
            raise
        self.state["up"] = True
        self.state["setup_s"] = round(time.monotonic() - t0, 2)
        self._save()
        return self

    def _network(self) -> None:
        bridge = f"rcb{self.state['tag']}"
        _sh("ip", "link", "add", bridge, "type", "bridge")
        self.state["links"].append(bridge)
        self._save()
        _sh("ip", "addr", "add", f"{self.controller_address}/24", "dev", bridge)
        _sh("ip", "link", "set", bridge, "up")
        for host in self.hosts:
            ns, veth = self.netns(host), self.veth(host)
            _sh("ip", "netns", "add", ns)
            self.state["netns"].append(ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.state["links"].append(veth)
            self._save()
            _sh("ip", "link", "set", veth, "master", bridge, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _files(self) -> None:
        r = self.root
        ctl = _short_hostname()
        lines = ["127.0.0.1 localhost", f"{self.controller_address} {ctl}"]
        lines += [f"{self.address(h)} {h}" for h in self.hosts]
        (r / "hosts").write_text("\n".join(lines) + "\n")
        ssh = r / "ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        if not (ssh / "id_ed25519").exists():
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "id_ed25519"))
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(r / "ssh_host_ed25519_key"))
        shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
        # The client side of every host: the cluster's key, no host-key prompts. Keep-alives
        # are the launcher's business (launch/multi_node.sh), not this file's.
        (ssh / "config").write_text("Host *\n  IdentityFile ~/.ssh/id_ed25519\n  StrictHostKeyChecking no\n"
                                    "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
        for f in ssh.iterdir():
            os.chmod(f, 0o600)
        for host in self.hosts:
            hd = r / host
            hd.mkdir(exist_ok=True)
            (hd / "sshd_config").write_text(
                f"ListenAddress {self.address(host)}\nPort 22\nHostKey {r / 'ssh_host_ed25519_key'}\n"
                f"PidFile {hd / 'sshd.pid'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nPrintMotd no\nPrintLastLog no\nUseDNS no\n"
                # A dead peer's session is closed within ~9 s (the launcher's keep-alives are the
                # client side of the same thing).
                "ClientAliveInterval 3\nClientAliveCountMax 3\n")
        if not Path("/root/.ssh").exists():  # the bind mount's target inside the hosts
            Path("/root/.ssh").mkdir(mode=0o700)
            self.state["made_ssh_dir"] = True
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory

    def _start_host(self, host: str) -> None:
        """PID 1 of the host: set the name, bind the hosts file and ssh folder, start sshd,
        then reap orphans until killed."""
        hd = self.root / host
        init = hd / "init.sh"
        init.write_text(f"""\
set -e
hostname {host}
mount --bind {self.root / 'hosts'} /etc/hosts
mount --bind {self.root / 'ssh'} /root/.ssh
{_which('sshd')} -f {hd / 'sshd_config'} -E {hd / 'sshd.log'}
echo up > {hd / 'ready'}
set +e
trap '' TERM INT HUP
while :; do sleep 3600 & wait; done
""")
        (hd / "ready").unlink(missing_ok=True)
        with open(hd / "init.log", "w") as log:  # the host keeps its own copy of the descriptor
            proc = subprocess.Popen([_which("nsenter"), f"--net=/run/netns/{self.netns(host)}", "--",
                                     _which("unshare"), "--uts", "--mount", "--pid", "--fork", "--mount-proc",
                                     "--propagation", "private", "bash", str(init)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.state.setdefault("unshare", {})[host] = proc.pid
        self._save()
        deadline = time.monotonic() + 20
        while not (hd / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {host} did not start: {(hd / 'init.log').read_text()[-2000:]}")
            time.sleep(0.05)
        # unshare --fork: the host's PID 1 is unshare's only child.
        child = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        self.state["init"][host] = int(child[0])
        self._save()

    def _wait_ssh(self) -> None:
        for host in self.hosts:
            deadline = time.monotonic() + 20
            while True:
                proc = self.run(self.hosts[0], ["ssh", host, "hostname"], capture_output=True, text=True, timeout=15)
                if proc.returncode == 0 and proc.stdout.strip() == host:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ssh {self.hosts[0]} -> {host}: {proc.stderr.strip()}")
                time.sleep(0.2)

    def _slurm(self) -> None:
        r = self.root
        key = r / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        (r / "munge").mkdir(mode=0o755, exist_ok=True)
        _sh(_which("munged"), "--force", f"--key-file={key}", f"--socket={r / 'munge' / 'munge.socket'}",
            f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'munge' / 'munged.log'}",
            f"--seed-file={r / 'munge' / 'munged.seed'}")
        self.state["daemons"]["munged"] = _read_pid(r / "munge" / "munged.pid")
        self._save()
        ctl_port, d_port = _free_port(), 6818
        nodes = "\n".join(f"NodeName={h} NodeAddr={self.address(h)} CPUs={self.cpus} State=UNKNOWN" for h in self.hosts)
        shutil.rmtree(r / "slurm", ignore_errors=True)  # a previous cluster's state in the same folder
        (r / "slurm").mkdir()
        (r / "slurm.conf").write_text(f"""\
ClusterName=radis{self.state['tag']}
SlurmctldHost={_short_hostname()}({self.controller_address})
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge' / 'munge.socket'}
StateSaveLocation={r / 'slurm' / 'ctld'}
SlurmdSpoolDir={r / 'slurm' / 'd-%n'}
SlurmctldPidFile={r / 'slurm' / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurm' / 'slurmd-%n.pid'}
SlurmctldLogFile={r / 'slurm' / 'slurmctld.log'}
SlurmdLogFile={r / 'slurm' / 'slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=20
SlurmctldTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=600
JobCompType=jobcomp/filetxt
JobCompLoc={r / 'slurm' / 'jobcomp.log'}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
{nodes}
PartitionName=main Nodes={','.join(self.hosts)} Default=YES MaxTime=INFINITE State=UP
""")
        env = {**os.environ, **self.slurm_env}
        proc = subprocess.run([_which("slurmctld"), "-f", str(r / "slurm.conf")], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"slurmctld did not start: {proc.stderr.strip()} "
                               f"{(r / 'slurm' / 'slurmctld.log').read_text()[-2000:]}")
        self.state["daemons"]["slurmctld"] = _read_pid(r / "slurm" / "slurmctld.pid")
        self._save()
        for host in self.hosts:
            self._start_slurmd(host)
        self.wait_nodes_idle()

    def _start_slurmd(self, host: str) -> None:
        conf = str(self.root / "slurm.conf")
        self.run(host, [_which("slurmd"), "-N", host, "-f", conf], env={**os.environ, **self.slurm_env}, check=True,
                 capture_output=True, timeout=60)

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        env = {**os.environ, **self.slurm_env}
        while True:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True,
                                 timeout=30, check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if states and all(states.get(h) == "idle" for h in self.hosts):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle after {timeout} s: {states}; "
                                   f"{(self.root / 'slurm' / 'slurmctld.log').read_text()[-2000:]}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ use

    def command(self, host: str, argv: list[str], cwd: str | os.PathLike | None = None) -> list[str]:
        """argv run inside every namespace of `host` (its network, name, mounts and PIDs), in
        `cwd` (entering a mount namespace otherwise leaves the process in /)."""
        return [_which("nsenter"), f"--target={self.host_pid(host)}", "--net", "--uts", "--mount", "--pid",
                f"--wd={Path(cwd or os.getcwd()).resolve()}", "--", *argv]

    def run(self, host: str, argv: list[str], cwd=None, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv, cwd), check=check, **kwargs)

    def popen(self, host: str, argv: list[str], cwd=None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv, cwd), **kwargs)

    def crash(self, host: str) -> None:
        """Power cut: SIGKILL to the host's PID 1 kills every process in the host at once."""
        try:
            os.kill(self.host_pid(host), signal.SIGKILL)
        except ProcessLookupError:
            pass

    def restart(self, host: str) -> None:
        """A crashed host booted again: a new PID 1 in the same network namespace, sshd and
        (where the cluster has Slurm) slurmd, which registers with the controller again."""
        self.crash(host)
        _kill(self.state.get("unshare", {}).get(host, 0))
        self._start_host(host)
        if self.state["daemons"].get("slurmctld"):
            self._start_slurmd(host)
            self.wait_nodes_idle()

    def partition(self, host: str, cut: bool = True) -> None:
        """The host's link down (cut=True) or up again: it is unreachable, its processes live on."""
        _sh("ip", "link", "set", self.veth(host), "down" if cut else "up")

    # ------------------------------------------------------------------ down

    def down(self) -> None:
        """Stop every daemon and host, remove every namespace and link; safe to call twice."""
        if not self.state:
            return
        for name, pid in list(self.state.get("daemons", {}).items()):
            _kill(pid)
        for pid in self.state.get("init", {}).values():
            _kill(pid)  # the host and all in it
        for pid in self.state.get("unshare", {}).values():
            _kill(pid)
        for ns in self.state.get("netns", []):
            _sh("ip", "netns", "delete", ns, check=False)
        for link in self.state.get("links", []):
            _sh("ip", "link", "delete", link, check=False)
        if self.state.get("made_ssh_dir"):
            try:
                Path("/root/.ssh").rmdir()
            except OSError:
                pass
        self.state = {}
        (self.root / STATE).unlink(missing_ok=True)


def _read_pid(path: Path, timeout: float = 10) -> int:
    """A daemon's PID file, which it writes after it has forked (empty for a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: no PID after {timeout} s")
        time.sleep(0.05)


def _kill(pid: int) -> None:
    if pid <= 0:  # never a process group
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:  # our own child: reap it
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up")
    p.add_argument("root")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--no-slurm", action="store_true")
    p = sub.add_parser("down")
    p.add_argument("root")
    p = sub.add_parser("run")
    p.add_argument("root")
    p.add_argument("host")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cluster = LocalCluster(args.root, **({"hosts": args.hosts} if args.cmd == "up" else {}))
    if args.cmd == "up":
        try:
            cluster.up(slurm=not args.no_slurm)
        except ClusterUnavailable as e:
            print(f"local_cluster: {e}", file=sys.stderr)
            return 2
        print(f"up in {cluster.state['setup_s']} s: " + ", ".join(f"{h} {cluster.address(h)}" for h in cluster.hosts)
              + f"; SLURM_CONF={cluster.root / 'slurm.conf'}")
        return 0
    if args.cmd == "down":
        cluster.down()
        return 0
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return cluster.run(args.host, argv).returncode


if __name__ == "__main__":
    sys.exit(main())
