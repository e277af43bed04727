#!/usr/bin/env bash
# Start a real single-node SLURM (slurmctld + slurmd + munge) on localhost, by hand, without
# systemd. Needs root. Idempotent: a running cluster is left as it is.
#   tests/slurm/slurm-up.sh      # install (if needed), configure, start, wait until the node is idle
#   tests/slurm/slurm-down.sh    # stop it again
set -euo pipefail
STATE=${EIGENATTN_SLURM_STATE:-/tmp/eigenattn-slurm}

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

if scontrol ping 2>/dev/null | grep -q "is UP"; then
    echo "slurm: already running"
    exit 0
fi

host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024) - 2048}' /proc/meminfo)
rm -rf "$STATE"
mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=eigenattn
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=300
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF

# munge: its key comes with the package; the socket directory must belong to the munge user.
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if ! [ -S /run/munge/munge.socket.2 ] || ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null

slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.2; done
scontrol ping | grep -q "is UP" || { echo "slurmctld did not come up"; cat "$STATE/slurmctld.log"; exit 1; }
slurmd
for _ in $(seq 150); do sinfo -h -o %T 2>/dev/null | grep -qx idle && break; sleep 0.2; done
sinfo -h -o %T | grep -qx idle || { echo "slurmd did not become idle"; sinfo; cat "$STATE/slurmd.log"; exit 1; }
echo "slurm: up ($(sinfo -h -o '%P %D %c %m %T'))"
