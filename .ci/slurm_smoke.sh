#!/usr/bin/env bash
# One-node SLURM cluster on 127.0.0.1 for the SLURM smoke test.
#
#   .ci/slurm_smoke.sh          install and start the cluster, run
#                               tests/test_slurm.py against it, stop it
#   .ci/slurm_smoke.sh start    install and start the cluster only
#   .ci/slurm_smoke.sh stop     stop the daemons that `start` started
#
# Needs root (it installs Debian packages, writes /etc/slurm/slurm.conf and
# starts munged, slurmctld and slurmd). It refuses to overwrite a slurm.conf
# that it did not write, so it never replaces a real cluster's config.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${FDPIPE_SLURM_STATE:-/tmp/fdpipe-slurm-ci}
CONF=/etc/slurm/slurm.conf
MARKER="# written by fdpipe .ci/slurm_smoke.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)
PYTHON=${PYTHON:-.venv/bin/python}

log() { echo "slurm_smoke: $*" >&2; }

install_packages() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

write_config() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "$CONF exists and was not written by this script; move it away to run the test"
        exit 1
    fi
    local node node_line
    node=$(hostname -s)
    # slurmd -C prints this machine's real CPU layout and memory, so the node
    # definition matches what slurmd will detect and the node is not drained.
    node_line=$(slurmd -C | head -n 1 | sed -E "s/^NodeName=[^ ]+/NodeName=$node NodeAddr=127.0.0.1/")
    mkdir -p "$STATE/spool/ctld" "$STATE/spool/d" /etc/slurm
    cat >"$CONF" <<EOF
$MARKER
ClusterName=fdpipe-ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue for a day, because with no
# accounting database squeue is the only source of their final state.
MinJobAge=86400
ReturnToService=2
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
$node_line State=UNKNOWN
PartitionName=ci Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    log "wrote $CONF for node $node"
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge "$STATE/munge"
    chown munge:munge /run/munge "$STATE/munge"
    # munged runs as user munge, so its pid file goes to a folder munge owns.
    runuser -u munge -- /usr/sbin/munged --pid-file="$STATE/munge/munged.pid" \
        --socket=/run/munge/munge.socket.2
}

wait_for_node() {
    local node state
    node=$(hostname -s)
    for _ in $(seq 60); do
        state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null || true)
        case $state in
            idle | mixed | allocated) log "node $node is $state"; return 0 ;;
            down* | drain* | unknown* | "") scontrol update NodeName="$node" State=RESUME \
                >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "node $node did not become idle (state '$state'); see $STATE/slurmd.log"
    return 1
}

start() {
    if [[ $(id -u) -ne 0 ]]; then
        log "needs root (installs packages and starts daemons)"
        exit 1
    fi
    mkdir -p "$STATE"
    install_packages
    write_config
    start_munge
    slurmctld -c
    slurmd
    wait_for_node
}

stop_pid() {
    local name=$1 file=$2 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) did not stop on SIGTERM; sending SIGKILL"
            kill -9 "$pid"
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$file"
}

stop() {
    # Jobs still running would keep slurmstepd processes alive.
    scancel --full --state=RUNNING --user=root >/dev/null 2>&1 || true
    stop_pid slurmd "$STATE/slurmd.pid"
    stop_pid slurmctld "$STATE/slurmctld.pid"
    stop_pid munged "$STATE/munge/munged.pid"
}

case ${1:-run} in
    start) start ;;
    stop) stop ;;
    run)
        trap stop EXIT
        start
        FDPIPE_SLURM_TEST=1 "$PYTHON" -m pytest -q -p no:cacheprovider \
            --basetemp="$STATE/pytest" tests/test_slurm.py
        ;;
    *)
        log "unknown command '$1'; use run (default), start or stop"
        exit 2
        ;;
esac
