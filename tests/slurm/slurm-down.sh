#!/usr/bin/env bash
# Stop the SLURM started by slurm-up.sh. Uses the pid files (a stopped daemon can linger as a
# zombie, so `kill -0` is not a reliable liveness test). Never fails.
STATE=${EIGENATTN_SLURM_STATE:-/tmp/eigenattn-slurm}
scancel --user=root >/dev/null 2>&1 || true
scontrol shutdown >/dev/null 2>&1 || true
for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null)
    [ -n "$pid" ] || continue
    for _ in $(seq 50); do
        state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
        case $state in gone|Z) break ;; esac
        [ "$f" = /run/munge/munged.pid ] && kill "$pid" 2>/dev/null
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
done
echo "slurm: down"
exit 0
