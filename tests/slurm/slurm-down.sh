#!/usr/bin/env bash
# Stop the SLURM started by slurm-up.sh. Uses the pid files (a stopped daemon can linger as a
# zombie, so `kill -0` is not a reliable liveness test). Never fails.
#   tests/slurm/slurm-down.sh                     # stop all three: slurmd, slurmctld, munged
#   tests/slurm/slurm-down.sh slurmctld slurmd    # stop only these (the test fixture names the
#                                                 # daemons it started, and leaves the others alone)
STATE=${EIGENATTN_SLURM_STATE:-/tmp/eigenattn-slurm}
want=${*:-slurmd slurmctld munged}
has() { case " $want " in *" $1 "*) return 0 ;; esac; return 1; }

if has slurmctld; then
    scancel --user=root >/dev/null 2>&1 || true
    if has slurmd; then
        scontrol shutdown >/dev/null 2>&1 || true
    else
        scontrol shutdown slurmctld >/dev/null 2>&1 || true
    fi
fi
for name in slurmd slurmctld munged; do
    has "$name" || continue
    case $name in munged) f=/run/munge/munged.pid ;; *) f=$STATE/$name.pid ;; esac
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null)
    [ -n "$pid" ] || continue
    for _ in $(seq 50); do
        state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
        case $state in gone|Z) break ;; esac
        [ "$name" = slurmd ] && ! has slurmctld && kill "$pid" 2>/dev/null
        [ "$name" = munged ] && kill "$pid" 2>/dev/null
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
done
echo "slurm: down ($want)"
exit 0
