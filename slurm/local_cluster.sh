#!/bin/bash
# A single-node SLURM on this machine, for tests and for trying the sbatch scripts: munge, slurmctld
# and slurmd, no accounting database.
#
#   slurm/local_cluster.sh start    # write slurm.conf for this host, start what is not running, wait until idle
#   slurm/local_cluster.sh stop     # stop the daemons this script started
#   slurm/local_cluster.sh status   # exit 0 if the cluster answers and its node is usable
#   slurm/local_cluster.sh conf     # print the path of slurm.conf (clients need SLURM_CONF=<it>)
#
# Needs root and the Debian packages slurm-wlm and munge (apt-get install -y slurm-wlm munge).
# The node is this host with the CPUs and memory that `slurmd -C` finds; one partition, `local`, no GPUs.
# State, logs and slurm.conf go to $SCATLAS_SLURM_DIR (default: .cache/slurm in the repository); the ports
# (SCATLAS_SLURMCTLD_PORT, SCATLAS_SLURMD_PORT) default to a pair in 20000-39999 picked from that path.
# Start is idempotent: a running cluster of the same directory is left as it is. Clients (sbatch,
# squeue, scontrol) find the cluster with SLURM_CONF:
#   export SLURM_CONF="$(slurm/local_cluster.sh conf)"

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${SCATLAS_SLURM_DIR:-$ROOT/.cache/slurm}"
CONF="$STATE/slurm.conf"
MUNGE_SOCKET=/run/munge/munge.socket.2
# Ports of this cluster: taken from the state directory, so that two checkouts (or a system slurmd on the
# default 6817/6818) do not answer each other's clients.
port_base=$(( 20000 + ($(cksum <<< "$STATE" | cut -d ' ' -f 1) % 10000) * 2 ))
CTLD_PORT="${SCATLAS_SLURMCTLD_PORT:-$port_base}"
SLURMD_PORT="${SCATLAS_SLURMD_PORT:-$(( port_base + 1 ))}"
export SLURM_CONF="$CONF"

die() {
    echo "local_cluster.sh: error: $*" >&2
    exit 1
}

say() {
    echo "local_cluster.sh: $*" >&2
}

# alive PIDFILE: exit 0 if the process named in PIDFILE runs.
alive() {
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

need_tools() {
    local tool
    for tool in munged munge unmunge slurmctld slurmd scontrol sinfo; do
        command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y slurm-wlm munge"
    done
    [[ "$(id -u)" == 0 ]] || die "the daemons of a local SLURM need root"
}

munge_works() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    if munge_works; then
        return  # a munged runs already (ours or the system's)
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating the munge key /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    runuser -u munge -- munged --socket="$MUNGE_SOCKET"
    touch "$STATE/munged.ours"  # stop it again at stop

    for _ in $(seq 50); do
        munge_works && return
        sleep 0.1
    done
    die "munged did not come up; see /var/log/munge/munged.log"
}

write_conf() {
    local node host
    # e.g. NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
    node="$(slurmd -C | head -n 1)"
    [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this host: $node"
    host="${node%% *}"
    host="${host#NodeName=}"
    mkdir -p "$STATE/ctld" "$STATE/d"
    cat > "$CONF.tmp" <<EOF
# written by slurm/local_cluster.sh: a single-node SLURM for tests
ClusterName=scatlas-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

node_state() {
    sinfo -h -N -o '%T' 2>/dev/null | head -n 1
}

cmd_start() {
    need_tools
    mkdir -p "$STATE"
    start_munge
    if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && cmd_status 2>/dev/null; then
        say "running already ($CONF)"
        echo "$CONF"
        return
    fi
    write_conf
    if ! alive "$STATE/slurmctld.pid"; then
        slurmctld -c -f "$CONF"  # -c: a clean start, no jobs from an earlier cluster
    fi
    if ! alive "$STATE/slurmd.pid"; then
        slurmd -f "$CONF"
    fi
    local state=""
    for _ in $(seq 150); do
        state="$(node_state)"
        case "$state" in
            idle | mixed | allocated | completing) break ;;
            down* | drain* | fail*) scontrol update NodeName=ALL State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    case "$state" in
        idle | mixed | allocated | completing) ;;
        *) die "the node is '${state:-not registered}' after 30 s; see $STATE/slurmctld.log and $STATE/slurmd.log" ;;
    esac
    say "up: $(sinfo -h -N -o '%N %c CPUs %m MB, partition %P')"
    echo "$CONF"
}

# stop_pid NAME PIDFILE: TERM the process, wait up to 10 s, then KILL it.
stop_pid() {
    local pid
    alive "$2" || { rm -f "$2"; return 0; }
    pid="$(cat "$2")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }
        sleep 0.1
    done
    say "$1 ($pid) did not stop; killing it"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$2"
}

cmd_stop() {
    if [[ -f "$CONF" ]]; then
        scancel --full --quiet --partition=local 2>/dev/null || true  # jobs go with the cluster
    fi
    stop_pid slurmd "$STATE/slurmd.pid"
    stop_pid slurmctld "$STATE/slurmctld.pid"
    if [[ -f "$STATE/munged.ours" ]]; then
        stop_pid munged /run/munge/munged.pid
        rm -f "$STATE/munged.ours"
    fi
    say "stopped"
}

cmd_status() {
    [[ -f "$CONF" ]] || { say "no cluster in $STATE"; return 1; }
    scontrol ping >/dev/null 2>&1 || { say "slurmctld does not answer ($CONF)"; return 1; }
    local state
    state="$(node_state)"
    case "$state" in
        idle | mixed | allocated | completing) return 0 ;;
        *) say "the node is '${state:-unknown}'"; return 1 ;;
    esac
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    conf) echo "$CONF" ;;
    *) echo "usage: slurm/local_cluster.sh start|stop|status|conf" >&2; exit 2 ;;
esac
