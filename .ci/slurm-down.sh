#!/usr/bin/env bash
# Stop the one-machine SLURM cluster started by .ci/slurm-up.sh.
#
#   bash .ci/slurm-down.sh            # stop slurmd, slurmctld (and munged if slurm-up started it)
#   bash .ci/slurm-down.sh --purge    # also delete the state folder and the slurm.conf it wrote
#
# Only daemons recorded in slurm-up's pid files are stopped; nothing else is touched.
# Running jobs are lost (their state folder goes with --purge).
set -euo pipefail

DIR=${PROMOTER_DIST_SLURM_DIR:-/tmp/promoter-dist-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# promoter-dist CI cluster, written by .ci/slurm-up.sh"
purge=0
[ "${1:-}" = "--purge" ] && purge=1

say() { echo "slurm-down: $*"; }

stop_pidfile() {  # stop_pidfile NAME FILE: TERM, wait up to 10 s, then KILL
    local name=$1 file=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        say "stopped $name (pid $pid)"
    fi
    rm -f "$file"
}

for file in "$DIR"/slurmd-*.pid; do
    [ -e "$file" ] || continue
    stop_pidfile "slurmd $(basename "$file" .pid | sed 's/^slurmd-//')" "$file"
done
stop_pidfile slurmctld "$DIR/slurmctld.pid"
if [ -f /run/munge/.started-by-promoter-dist ]; then
    stop_pidfile munged /run/munge/munged.pid
    rm -f /run/munge/.started-by-promoter-dist
fi
if [ "$purge" = 1 ]; then
    rm -rf "$DIR"
    if [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF"; then rm -f "$CONF"; fi
    # The n1/n2 host names of the two-node mode (rewritten in place: /etc/hosts may be a mount).
    if grep -qF "# promoter-dist CI cluster nodes" /etc/hosts; then
        hosts=$(grep -vF "# promoter-dist CI cluster nodes" /etc/hosts)
        printf '%s\n' "$hosts" > /etc/hosts
    fi
    say "removed $DIR and $CONF"
fi
say "down"
