#!/usr/bin/env bash
# A real single-node SLURM for the tests: munge, MariaDB + slurmdbd (accounting,
# as real sites have it), slurmctld and slurmd, all under one directory, with
# a default CPU partition, a `gpu` partition and fake GPUs declared as GRES.
#
#   tests/slurm/cluster.sh start   # installs the Debian packages when missing
#   tests/slurm/cluster.sh stop    # stops every daemon it started, by PID
#   tests/slurm/cluster.sh env     # prints the variables a client needs
#
# SLURM_TEST_DIR (default /tmp/unet-slurm) holds configs, state, logs, PIDs.
# See ../shared/docs/SLURM-TESTING.md for the pitfalls this script avoids.
set -euo pipefail

D=${SLURM_TEST_DIR:-/tmp/unet-slurm}
HOST=$(hostname -s)
CLUSTER=unettest
GPUS=${SLURM_TEST_GPUS:-2}
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
DB_PORT=${SLURM_TEST_DB_PORT:-3307}

log() { echo "[slurm-test] $*" >&2; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd slurmdbd munged sbatch mariadbd; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing SLURM, munge and MariaDB (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq 1 $((limit * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "timed out waiting for $what"; return 1
}

write_configs() {
    mkdir -p "$D"/{state,spool,log,mysql,gpu}
    for i in $(seq 0 $((GPUS - 1))); do ln -sf /dev/null "$D/gpu/nvidia$i"; done
    cat > "$D/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=$D/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURM_TEST_CTLD_PORT:-6817}
SlurmdPort=${SLURM_TEST_SLURMD_PORT:-6818}
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=${SLURM_TEST_DBD_PORT:-6819}
AccountingStoragePass=$D/munge.sock
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
DefMemPerCPU=1000
MinJobAge=600
ReturnToService=2
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
CONF
    cat > "$D/gres.conf" <<CONF
AutoDetect=off
NodeName=$HOST Name=gpu File=$D/gpu/nvidia[0-$((GPUS - 1))]
CONF
    cat > "$D/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$D/munge.sock
DbdHost=localhost
DbdPort=${SLURM_TEST_DBD_PORT:-6819}
SlurmUser=root
PidFile=$D/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmtest
StorageLoc=slurm_acct_db
CONF
    chmod 600 "$D/slurmdbd.conf"
    # Job steps lose SLURM_CONF (the job-step plugin strips SLURM_* before srun):
    # real sites have /etc/slurm/slurm.conf, so the test cluster provides it too.
    mkdir -p /etc/slurm
    for f in slurm.conf gres.conf; do
        if [ -e "/etc/slurm/$f" ] && [ ! -L "/etc/slurm/$f" ]; then
            log "/etc/slurm/$f exists and is not ours; leaving it (set SLURM_CONF in jobs instead)"
        else
            ln -sf "$D/$f" "/etc/slurm/$f"
        fi
    done
}

start_munge() {
    [ -f "$D/munge.key" ] || mungekey --create --keyfile "$D/munge.key" >/dev/null 2>&1 || \
        dd if=/dev/urandom of="$D/munge.key" bs=1024 count=1 2>/dev/null
    chmod 600 "$D/munge.key"
    munged --force --key-file "$D/munge.key" --socket "$D/munge.sock" --pid-file "$D/munged.pid" \
        --log-file "$D/log/munged.log" --seed-file "$D/munge.seed"
    wait_for 10 munge test -S "$D/munge.sock"
}

start_mariadb() {
    if [ ! -d "$D/mysql/mysql" ]; then
        mariadb-install-db --user=root --datadir="$D/mysql" --auth-root-authentication-method=normal \
            >"$D/log/mariadb-install.log" 2>&1
    fi
    (mariadbd --user=root --datadir="$D/mysql" --socket="$D/mysql.sock" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --pid-file="$D/mariadb.pid" --skip-grant-tables=0 \
        --log-error="$D/log/mariadb.log" >/dev/null 2>&1 &)
    wait_for 60 MariaDB mariadb --socket="$D/mysql.sock" -uroot -e "select 1"
    mariadb --socket="$D/mysql.sock" -uroot <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmtest';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmtest';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

start() {
    install_packages
    if [ -f "$D/slurmctld.pid" ] && kill -0 "$(cat "$D/slurmctld.pid")" 2>/dev/null; then
        log "already running in $D"; return 0
    fi
    write_configs
    export SLURM_CONF="$D/slurm.conf"
    start_munge
    start_mariadb
    slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for 30 slurmdbd sacctmgr -i list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i add account unet Cluster="$CLUSTER" Description=tests Organization=tests >/dev/null 2>&1 || true
    sacctmgr -i add user root Account=unet Cluster="$CLUSTER" >/dev/null 2>&1 || true
    slurmctld -f "$D/slurm.conf"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$D/slurm.conf"
    wait_for 60 "node $HOST idle" bash -c "sinfo -h -N -o '%T' | grep -q idle"
    log "SLURM up: $(sinfo -h -o '%P %a %D %T' | tr '\n' ';')"
}

stop_pid() {
    local file=$1
    [ -f "$file" ] || return 0
    local pid
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop() {
    for p in slurmd slurmctld slurmdbd mariadb munged; do stop_pid "$D/$p.pid"; done
    for f in slurm.conf gres.conf; do
        if [ -L "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" = "$D/$f" ]; then rm -f "/etc/slurm/$f"; fi
    done
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "SLURM_CONF=$D/slurm.conf" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
