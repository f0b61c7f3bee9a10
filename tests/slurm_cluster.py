"""A real single-node SLURM cluster on this machine, for the SLURM tests and CI.

``python tests/slurm_cluster.py start`` installs nothing: it needs Debian's ``slurm-wlm`` and ``munge``
(``.ci/run`` installs them) and root. It writes ``slurm.conf`` for one node (this machine, reached at
127.0.0.1, with its CPUs and memory) in one partition, starts ``munged`` as the munge user, then
``slurmctld`` and ``slurmd``, and waits until the node takes jobs. ``stop`` ends the daemons it started
(their pid files say which). The tests call :func:`ensure` and :func:`stop` the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PARTITION = "debug"
CONF = Path("/etc/slurm/slurm.conf")
STATE = Path("/var/spool/cassia-slurm")
LOGS = Path("/var/log/slurm")
MUNGE_PID = Path("/run/munge/munged.pid")
# The tests' settings: how processes are tracked and how memory is enforced are those the tests rely on
# (an over-memory job is killed by slurmstepd; a job's end state stays visible to scontrol for a while).
SETTINGS = {
    "ClusterName": "cassia",
    "SlurmUser": "root",
    "SlurmdUser": "root",
    "AuthType": "auth/munge",
    "ProctrackType": "proctrack/linuxproc",
    "TaskPlugin": "task/none",
    "SelectType": "select/cons_tres",
    "SelectTypeParameters": "CR_Core_Memory",
    "JobAcctGatherType": "jobacct_gather/linux",
    "JobAcctGatherParams": "OverMemoryKill",
    "JobAcctGatherFrequency": "task=1",
    "JobCompType": "jobcomp/filetxt",
    "JobCompLoc": str(LOGS / "jobcomp.txt"),
    "AccountingStorageType": "accounting_storage/none",
    "MpiDefault": "none",
    "ReturnToService": "2",
    "SchedulerType": "sched/backfill",
    "SchedulerParameters": "sched_interval=2",
    "MinJobAge": "600",
    "KillWait": "2",
    "InactiveLimit": "0",
    "SlurmctldPort": "6817",
    "SlurmdPort": "6818",
    "StateSaveLocation": str(STATE / "ctld"),
    "SlurmdSpoolDir": str(STATE / "d"),
    "SlurmctldPidFile": str(STATE / "slurmctld.pid"),
    "SlurmdPidFile": str(STATE / "slurmd.pid"),
    "SlurmctldLogFile": str(LOGS / "slurmctld.log"),
    "SlurmdLogFile": str(LOGS / "slurmd.log"),
}

# The tests' jobs mostly wait (for a model's answer, a walltime, a signal): the partition lets a few jobs share
# a core, so that the tests' runs go on side by side instead of queueing behind one another on two cores.
SHARING = "OverSubscribe=FORCE:4"


def available() -> str:
    """``""`` when a SLURM cluster can be used or started here, else why not."""
    missing = [name for name in ("sbatch", "squeue", "scontrol", "slurmctld", "slurmd", "munged")
               if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0 and not running():
        return "no SLURM cluster is running and starting one needs root"
    return ""


def running() -> bool:
    """Whether a cluster answers and its partition has a node that takes jobs."""
    try:
        out = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%t"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mix", "alloc", "comp") for s in states)


def _node() -> tuple[str, str, str]:
    """This machine's node name, CPUs and memory (MB), as slurmd sees them."""
    fields = dict(item.split("=", 1) for item in
                  subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.split()
                  if "=" in item)
    return fields["NodeName"], fields["CPUs"], fields["RealMemory"]


def write_conf() -> None:
    name, cpus, memory = _node()
    lines = [f"SlurmctldHost={name}(127.0.0.1)", *(f"{k}={v}" for k, v in SETTINGS.items()),
             f"NodeName={name} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN",
             f"PartitionName={PARTITION} Nodes={name} Default=YES MaxTime=INFINITE State=UP {SHARING}"]
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def start(timeout: float = 240.0) -> None:
    """Write the configuration and start munged, slurmctld and slurmd; wait until the node takes jobs."""
    write_conf()
    for folder in (STATE / "ctld", STATE / "d", LOGS):
        folder.mkdir(parents=True, exist_ok=True)
    if not _alive(MUNGE_PID):
        key = Path("/etc/munge/munge.key")
        if not key.exists():  # Debian's package makes one; a key of our own otherwise
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
            shutil.chown(key, "munge", "munge")
        for folder in (Path("/run/munge"), Path("/var/lib/munge"), Path("/var/log/munge")):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True)
    if not _alive(STATE / "slurmctld.pid"):
        subprocess.run(["/usr/sbin/slurmctld", "-c"], check=True)  # -c: a clean state, no jobs of a past cluster
    if not _alive(STATE / "slurmd.pid"):
        subprocess.run(["/usr/sbin/slurmd"], check=True)
    deadline = time.monotonic() + timeout
    while not running():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the SLURM node did not come up within {timeout:g} s; see {LOGS}")
        name = _node()[0]
        subprocess.run(["scontrol", "update", f"NodeName={name}", "State=RESUME"], capture_output=True)
        time.sleep(2)


def stop() -> None:
    """Cancel every job and end the daemons this module started (by their pid files)."""
    subprocess.run(["scancel", "--full", "-p", PARTITION], capture_output=True)
    for pid_file in (STATE / "slurmd.pid", STATE / "slurmctld.pid", MUNGE_PID):
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)


def ensure() -> bool:
    """Start the cluster when none runs; whether this call started it (then the caller stops it)."""
    if running():
        return False
    start()
    return True


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "status"
    if command == "start":
        ensure()
        print("SLURM cluster up:", subprocess.run(["sinfo"], capture_output=True, text=True).stdout)
    elif command == "stop":
        stop()
    else:
        print("running" if running() else "not running")
        sys.exit(0 if running() else 1)
