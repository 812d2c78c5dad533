#!/usr/bin/env bash
# A real single-node SLURM cluster, with accounting, on this machine: for the SLURM tests, CI and trying
# `hydra/launcher=slurm` without a cluster. Needs root on Debian/Ubuntu (apt-get); no systemd needed.
#
#   scripts/slurm_local.sh up       install the packages if missing, write the configs, start the daemons,
#                                   wait until the node is idle (idempotent: a running cluster is left as is)
#   scripts/slurm_local.sh down     cancel the cluster's jobs and stop the daemons this script started,
#                                   by their recorded PIDs only (idempotent)
#   scripts/slurm_local.sh status   the daemons and `sinfo`; exit 0 when the cluster is up, 3 when not
#
# Why each piece is there (measured on a 2-core Debian 12 VM):
# - slurmdbd + MariaDB: without accounting `sacct` fails, and submitit then waits forever on a cancelled job.
# - EnforcePartLimits=ALL: otherwise a request larger than the node waits in the queue forever.
# - batch_sched_delay=0: saves ~2 s per job.
# - KillWait: a cancelled or requeued job is killed this long after SIGTERM (submitit ignores SIGTERM).
# - proctrack/linuxproc, task/none: no cgroups needed.
# - a requeued job is held 120 s unless released: `scontrol update JobId=<id> StartTime=now`.
# Changed settings (e.g. SLURM_LOCAL_KILL_WAIT) take effect after `down` and `up`.
#
# Environment: SLURM_LOCAL_STATE (state dir, default /var/lib/outlier-study-slurm), SLURM_LOCAL_TIMEOUT
# (seconds to wait for each daemon and the idle node, default 60), SLURM_LOCAL_DB_PORT (MariaDB port on
# 127.0.0.1, default 3307), SLURM_LOCAL_KILL_WAIT (seconds between SIGTERM and SIGKILL of a job, default 2).
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/lib/outlier-study-slurm}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
KILL_WAIT=${SLURM_LOCAL_KILL_WAIT:-2}
CLUSTER=local
PARTITION=debug
CONF_DIR=/etc/slurm
MARKER="# written by outlier-study scripts/slurm_local.sh"
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
MUNGE_SOCKET=/run/munge/munge.socket.2
DB_SOCKET=$STATE/mysql/mysqld.sock
NODE=$(hostname -s)

say() { echo "slurm_local: $*"; }
die() {
    echo "slurm_local: error: $*" >&2
    exit 1
}

# --- processes we started: one PID file each under $STATE/pids ------------------------------------------

pid_of() { # the recorded PID of daemon $1 if that process still runs that program, else nothing
    local file="$STATE/pids/$1.pid" pid
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    if [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$1"* ]]; then echo "$pid"; fi
}

launch() { # launch NAME LOG CMD...: start a foreground daemon in its own session and record its PID
    local name=$1 log=$2
    shift 2
    setsid "$@" >>"$log" 2>&1 </dev/null &
    echo $! >"$STATE/pids/$name.pid"
}

wait_for() { # wait_for WHAT CMD...: retry CMD until it succeeds, at most $TIMEOUT seconds
    local what=$1 deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what not ready after ${TIMEOUT} s (logs: $STATE/log/)"
        sleep 0.2
    done
}

stop() { # stop NAME...: SIGTERM the recorded PIDs, SIGKILL after $TIMEOUT s; nothing else is ever signalled
    local name pid pids=() deadline
    for name in "$@"; do
        pid=$(pid_of "$name")
        rm -f "$STATE/pids/$name.pid"
        if [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null; then
            pids+=("$pid")
            say "stopping $name (pid $pid)"
        fi
    done
    deadline=$((SECONDS + TIMEOUT))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
}

# --- install and configure -------------------------------------------------------------------------------

install_packages() {
    local missing=() pkg policy=/usr/sbin/policy-rc.d
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get to install them"
    ((EUID == 0)) || die "packages missing (${missing[*]}); run as root to install them"
    say "installing ${missing[*]}"
    # Keep the packages' init scripts from starting system-wide daemons: this script starts its own.
    local own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null; } || rc=$?
    ((own_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

write_if_changed() { # write_if_changed PATH MODE: stdin to PATH atomically, only when the content differs
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if cmp -s "$tmp" "$path"; then rm -f "$tmp"; else mv -f "$tmp" "$path"; fi
}

ours_or_absent() { # refuse to overwrite a config this script did not write (a real cluster's)
    [[ ! -e $1 ]] || grep -qF "$MARKER" "$1" || die "$1 exists and was not written by this script; not touching it"
}

write_configs() {
    mkdir -p "$STATE"/{pids,log,slurmctld,slurmd} "$CONF_DIR"
    chmod 755 "$STATE" # the mysql user must reach its datadir; secrets are 600 files
    ours_or_absent "$CONF_DIR/slurm.conf"
    ours_or_absent "$CONF_DIR/slurmdbd.conf"
    [[ -f $STATE/db.pass ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/db.pass")
    # The node as slurmd itself sees it (CPUs, sockets, cores, RealMemory in MB), so it never drains.
    local node_line
    node_line=$(slurmd -C | grep -m1 '^NodeName=') || die "slurmd -C failed"
    write_if_changed "$CONF_DIR/slurm.conf" 644 <<EOF
$MARKER: a single-node test cluster
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld/slurmctld.pid
SlurmdPidFile=$STATE/slurmd/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
EnforcePartLimits=ALL
KillWait=$KILL_WAIT
InactiveLimit=0
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
${node_line%% UpTime=*} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    write_if_changed "$CONF_DIR/slurmdbd.conf" 600 <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(<"$STATE/db.pass")
StorageLoc=slurm_acct_db
EOF
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
}

# --- daemons ---------------------------------------------------------------------------------------------

munge_works() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }
db() { mariadb --no-defaults --socket="$DB_SOCKET" -u root "$@"; }

start_munge() {
    if [[ -n $(pid_of munged) ]] || munge_works >/dev/null 2>&1; then return 0; fi # ours, or the system's
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    launch munged "$STATE/log/munged.out" setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --force
    wait_for munged munge_works
}

start_mariadb() {
    [[ -z $(pid_of mariadbd) ]] || return 0
    if [[ ! -d $STATE/mysql/mysql ]]; then
        rm -rf "$STATE/mysql"
        install -d -o mysql -g mysql -m 700 "$STATE/mysql"
        mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" \
            --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
    fi
    launch mariadbd "$STATE/log/mariadb.out" mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
        --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/mysql/mariadbd.pid" \
        --log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
    wait_for mariadbd db -e "SELECT 1"
    local pass
    pass=$(<"$STATE/db.pass")
    db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
           ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
           FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    [[ -z $(pid_of slurmdbd) ]] || return 0
    launch slurmdbd "$STATE/log/slurmdbd.out" slurmdbd -D
    wait_for slurmdbd sacctmgr -n show cluster
    if [[ -z $(sacctmgr -n -P show cluster format=cluster where cluster="$CLUSTER") ]]; then
        sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    [[ -z $(pid_of slurmctld) ]] || return 0
    launch slurmctld "$STATE/log/slurmctld.out" slurmctld -D
    wait_for slurmctld scontrol ping
}

start_slurmd() {
    [[ -z $(pid_of slurmd) ]] || return 0
    launch slurmd "$STATE/log/slurmd.out" slurmd -D -N "$NODE"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state
    while :; do
        state=$(node_state)
        case $state in
        idle | mixed | allocated | completing) return 0 ;;
        drain* | down*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        ((SECONDS < deadline)) || die "node $NODE not idle after ${TIMEOUT} s (state: ${state:-none}); see $STATE/log/slurmd.log"
        sleep 0.2
    done
}

# --- commands --------------------------------------------------------------------------------------------

up() {
    ((EUID == 0)) || die "must run as root (it installs packages and starts system daemons)"
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    wait_idle
    say "up: cluster '$CLUSTER', partition '$PARTITION' (default), node $NODE ($(sinfo -h -n "$NODE" -o '%c CPUs, %m MB'))"
}

down() {
    if [[ -n $(pid_of slurmctld) ]]; then # the cluster is ours: end its jobs so no job step outlives it
        squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
    fi
    stop slurmd slurmctld slurmdbd # the SLURM daemons first, then what they use
    stop mariadbd munged
    say "down"
}

status() {
    local name pid rc=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        elif [[ $name == munged ]] && munge_works >/dev/null 2>&1; then
            printf '%-10s running (not started by this script)\n' "$name"
        else
            printf '%-10s stopped\n' "$name"
            rc=3
        fi
    done
    if ((rc == 0)) && scontrol ping >/dev/null 2>&1; then
        sinfo
    else
        rc=3
    fi
    return $rc
}

case ${1:-} in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
