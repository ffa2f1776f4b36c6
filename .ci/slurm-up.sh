#!/usr/bin/env bash
# Bring up a real one-machine SLURM cluster (slurmctld + slurmd + munged) for the test suite.
#
#   sudo bash .ci/slurm-up.sh          # prints "slurm-up: ..." lines; exit 0 once `srun` works
#
# Installs Debian's slurm-wlm and munge when missing (apt-get, non-interactive), creates a
# munge key, writes /etc/slurm/slurm.conf (one node = this machine, one partition `debug`),
# and starts the daemons as root with their state, spool and logs under $PROMOTER_DIST_SLURM_DIR
# (default /tmp/promoter-dist-slurm). Idempotent: when the cluster is already up it does
# nothing. Safe to call from several processes at once (one holds a lock, the others wait and
# then find the cluster up). Stop it with .ci/slurm-down.sh.
#
# Knobs (environment):
#   PROMOTER_DIST_SLURM_DIR    state/spool/log folder (default /tmp/promoter-dist-slurm)
#   PROMOTER_DIST_SLURM_NODES  1 (default) or 2: with 2, two slurmd daemons on this machine play
#                              nodes n1 and n2 (needs a slurmd built with multiple-slurmd support)
#   PROMOTER_DIST_SLURM_WAIT   seconds to wait for the node to come up (default 60)
#
# A slurm.conf that this script did not write is never overwritten: the script stops with a
# message instead (it would otherwise break a real cluster's configuration).
set -euo pipefail

DIR=${PROMOTER_DIST_SLURM_DIR:-/tmp/promoter-dist-slurm}
NODES=${PROMOTER_DIST_SLURM_NODES:-1}
WAIT_S=${PROMOTER_DIST_SLURM_WAIT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# promoter-dist CI cluster, written by .ci/slurm-up.sh"
HOSTS_MARKER="# promoter-dist CI cluster nodes"
LOCK=/tmp/promoter-dist-slurm.lock
HOST=$(hostname -s)

say() { echo "slurm-up: $*"; }
die() { echo "slurm-up: error: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts slurmctld/slurmd as root)"
[ "$NODES" = 1 ] || [ "$NODES" = 2 ] || die "PROMOTER_DIST_SLURM_NODES must be 1 or 2, not '$NODES'"

# One caller at a time; the others block here, then see the cluster up and return at once.
exec 9>"$LOCK"
flock 9

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_names() { if [ "$NODES" = 2 ]; then echo "n1 n2"; else echo "$HOST"; fi; }

cluster_ready() {
    # Controller answers and every node is usable (idle, mixed or allocated: busy is fine).
    command -v scontrol >/dev/null 2>&1 || return 1
    [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF" || return 1
    timeout 10 scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    local n state
    for n in $(node_names); do
        state=$(timeout 10 sinfo -h -n "$n" -o '%T' 2>/dev/null | head -1)
        case "$state" in idle|mixed|allocated|completing) ;; *) return 1 ;; esac
    done
}

if cluster_ready; then
    say "already up ($(node_names)); nothing to do"
    exit 0
fi
if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace it (use that cluster, or move the file away)"
fi

# ----------------------------------------------------------------------------- install
t0=$(now)
need_install=0
for tool in slurmctld slurmd sbatch srun scontrol munged mungekey; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need_install=1
done
if [ "$need_install" = 1 ]; then
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' maintainer scripts from starting daemons (no init system here, and a
    # slurmctld without a config would fail the install); we start them ourselves below.
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    install_pkgs() { apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends slurm-wlm munge >"$1" 2>&1; }
    log=$(mktemp)
    if ! install_pkgs "$log"; then
        say "apt-get install failed; refreshing the package lists and retrying"
        apt-get update -q >/dev/null 2>&1 || true
        install_pkgs "$log" || { tail -20 "$log" >&2; [ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install slurm-wlm munge failed"; }
    fi
    rm -f "$log"
    [ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d
    say "installed in $(since "$t0") s"
else
    say "slurm and munge already installed"
fi
t1=$(now)

# ----------------------------------------------------------------------------- munge
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key --force
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged 9>&-  # daemons must not inherit the lock
    touch "/run/munge/.started-by-promoter-dist"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ----------------------------------------------------------------------------- slurm.conf
cpus=$(nproc)
mem_total_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo)
# Below what slurmd detects (MemTotal) so the node registers, and derived from MemTotal only
# so that the file (and hence the idempotency check) is the same on every run.
real_mb=$(( mem_total_mb * 3 / 4 / 1024 * 1024 ))
mkdir -p "$DIR/state" "$DIR/log" /etc/slurm
if [ "$NODES" = 2 ]; then
    # Node names must resolve (jobs use the first one as MASTER_ADDR): both are this machine.
    grep -qE "^127\.0\.0\.1[[:space:]]+n1 n2[[:space:]]+$HOSTS_MARKER" /etc/hosts \
        || echo "127.0.0.1 n1 n2 $HOSTS_MARKER" >> /etc/hosts
    # Two slurmd daemons on this machine, told apart by port; both resolve to this host.
    node_lines="NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$(( real_mb / 2 )) State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$(( real_mb / 2 )) State=UNKNOWN"
    def_mem=$(( real_mb / 2 / cpus ))
else
    node_lines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN"
    def_mem=$(( real_mb / cpus ))
fi
tmp_conf=$(mktemp)
cat > "$tmp_conf" <<EOF
$MARKER
ClusterName=promoterci
# Addresses given explicitly: nothing depends on how this machine's name resolves.
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
MpiDefault=none
# No cgroups in this sandbox: track processes through /proc, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
SchedulerType=sched/backfill
# Requeue (preemption / time limit) must be allowed; a requeued job must not be held.
JobRequeue=1
# Fast turnaround for tests: short kill grace, no overtime, quick node return.
KillWait=5
OverTimeLimit=0
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
# Finished jobs stay visible to scontrol for 10 minutes (no accounting database here).
MinJobAge=600
$node_lines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$tmp_conf" "$CONF" 2>/dev/null; then
    # A new file means restarting the daemons below: never under someone's running jobs.
    if pid_alive "$DIR/slurmctld.pid" && [ -n "$(timeout 10 squeue -h -o %i 2>/dev/null)" ]; then
        rm -f "$tmp_conf"
        die "the cluster runs with another configuration (e.g. another PROMOTER_DIST_SLURM_NODES) and has jobs; wait for them (squeue) or stop it with .ci/slurm-down.sh"
    fi
    mv "$tmp_conf" "$CONF"
    chmod 0644 "$CONF"
    conf_changed=1
else
    rm -f "$tmp_conf"
    conf_changed=0
fi

# ----------------------------------------------------------------------------- daemons

if [ "$conf_changed" = 1 ]; then
    # Node definitions changed: `scontrol reconfigure` does not re-create node records
    # reliably, so restart the daemons on the new file.
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
        if pid_alive "$pidfile"; then
            pid=$(cat "$pidfile"); kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
if ! pid_alive "$DIR/slurmctld.pid"; then
    say "starting slurmctld"
    slurmctld 9>&- || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
fi
for _ in $(seq 100); do timeout 5 scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.2; done
timeout 5 scontrol ping 2>/dev/null | grep -q "is UP" || { tail -20 "$DIR/log/slurmctld.log" >&2 || true; die "slurmctld does not answer"; }

for n in $(node_names); do
    mkdir -p "$DIR/spool-$n"
    if ! pid_alive "$DIR/slurmd-$n.pid"; then
        say "starting slurmd ($n)"
        if [ "$NODES" = 2 ]; then slurmd -N "$n" 9>&-; else slurmd 9>&-; fi \
            || die "slurmd $n did not start (see $DIR/log/slurmd-$n.log)"
    fi
done

deadline=$(( $(date +%s) + WAIT_S ))
for n in $(node_names); do
    while :; do
        state=$(timeout 5 sinfo -h -n "$n" -o '%T' 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mixed|allocated|completing) break ;;
            down*|drain*|fail*) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        if [ "$(date +%s)" -ge "$deadline" ]; then
            tail -20 "$DIR/log/slurmd-$n.log" >&2 || true
            die "node $n is '$state' after ${WAIT_S} s (see $DIR/log/)"
        fi
        sleep 0.5
    done
done
total_nodes=$(echo $(node_names) | wc -w)
out=$(timeout 60 srun -N"$total_nodes" -n2 hostname 2>&1) || die "srun -N$total_nodes -n2 hostname failed: $out"
[ "$(echo "$out" | wc -l)" = 2 ] || die "srun -n2 ran $(echo "$out" | wc -l) tasks, expected 2: $out"
say "up in $(since "$t1") s (nodes $(node_names): $cpus CPUs, $(( real_mb / total_nodes )) MB each; partition debug; state in $DIR)"
