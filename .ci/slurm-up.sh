#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for tests/test_slurm_cluster.py: installs Debian's slurm-wlm and
# munge if missing, writes /etc/slurm/slurm.conf for this node (its real CPUs and memory), starts munged,
# slurmctld and slurmd without systemd, and waits until `sinfo` shows the node idle. Idempotent: a cluster
# that already answers with this config is left as it is. Needs root (or sudo) and apt-get.
#
#   .ci/slurm-up.sh          # then: sinfo; .venv/bin/python -m pytest tests/test_slurm_cluster.py
set -euo pipefail

t0=$SECONDS
say() { echo "slurm-up [$((SECONDS - t0)) s]: $*"; }
SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "slurm-up: needs root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

# -- packages ---------------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends slurm-wlm munge >/dev/null
    say "installed $(dpkg-query -W -f='${Package} ${Version}, ' slurm-wlm munge | sed 's/, $//')"
else
    say "slurm-wlm and munge already installed"
fi

# -- config -----------------------------------------------------------------------------------------------
node=$(hostname -s)
cpus=$(nproc --all)
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
mem_mb=$(( mem_mb - mem_mb / 20 ))  # slurmd refuses a node that reports less than RealMemory: keep 5% slack
conf=$(cat <<EOF
# written by .ci/slurm-up.sh: a one-node test cluster (daemons run as root, no cgroups, no accounting)
ClusterName=ceiling-ci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$(( mem_mb / cpus ))
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
KillWait=5
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
)
$SUDO mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
changed=0
if [ "$($SUDO cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
    printf '%s\n' "$conf" | $SUDO tee /etc/slurm/slurm.conf >/dev/null
    changed=1
    say "wrote /etc/slurm/slurm.conf: node ${node}, ${cpus} CPUs, ${mem_mb} MB"
fi

# -- daemons (no systemd here: started directly, tracked by their pid files) -------------------------------
running() { [ -f "$1" ] && $SUDO kill -0 "$($SUDO cat "$1" 2>/dev/null)" 2>/dev/null; }
stop() {  # $1: pid file; only the daemon this script started
    if running "$1"; then
        $SUDO kill "$($SUDO cat "$1" 2>/dev/null)" 2>/dev/null || true  # it may have just exited
        for _ in $(seq 50); do running "$1" || break; sleep 0.1; done
        say "stopped $(basename "$1" .pid) for the new config"
    fi
}

if ! running /run/munge/munged.pid; then
    if [ ! -s /etc/munge/munge.key ]; then
        $SUDO mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        $SUDO chown munge:munge /etc/munge/munge.key
        $SUDO chmod 400 /etc/munge/munge.key
    fi
    $SUDO mkdir -p /run/munge && $SUDO chown munge:munge /run/munge
    # munged checks that its key and directories belong to the user it runs as: the package's munge user
    $SUDO runuser -u munge -- /usr/sbin/munged
    say "started munged"
fi

if [ "$changed" = 1 ]; then
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi
if ! running /run/slurmctld.pid; then
    $SUDO /usr/sbin/slurmctld
    say "started slurmctld"
fi
if ! running /run/slurmd.pid; then
    $SUDO /usr/sbin/slurmd
    say "started slurmd"
fi

# -- wait for the node ------------------------------------------------------------------------------------
state=""
for _ in $(seq 120); do
    state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null || true)
    case "$state" in
        idle|mixed|allocated) break ;;
        down*|drain*) $SUDO scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mixed|allocated) say "node ${node} is ${state}: $(sinfo -h -o '%P %D %c CPUs %m MB')" ;;
    *)
        echo "slurm-up: node ${node} not up (sinfo: '${state:-no answer}'); logs:" >&2
        $SUDO tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        exit 1 ;;
esac
