#!/usr/bin/env bash
# Start a real one-node Slurm cluster with accounting on this machine: munge, MariaDB, slurmdbd,
# slurmctld, slurmd (Debian 12 packages, installed if missing). For development, CI, and trying
# ftlib without a cluster. Idempotent: when everything is up it returns in about a second.
# Needs root (as on CI and dev machines here). Stop it with slurm/stop-cluster.sh.
#
# State, logs and pid files: ${FTLIB_SLURM_DIR:-/var/tmp/ftlib-slurm}. Configs: /etc/slurm/.
set -euo pipefail

STATE=${FTLIB_SLURM_DIR:-/var/tmp/ftlib-slurm}
PARTITION=${FTLIB_SLURM_PARTITION:-debug}
CLUSTER=ftlib
HOST=$(hostname -s)
LOG=$STATE/log
export SLURM_CONF=/etc/slurm/slurm.conf

say() { echo "slurm: $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
fail() { say "$1"; say "see the logs in $LOG"; exit 1; }

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1 | tr -d '*~#'; }

if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && alive "$STATE/slurmdbd.pid" \
   && [[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]]; then
  echo "slurm cluster ready: partition $PARTITION, node $HOST, state dir $STATE"
  exit 0
fi

# --- packages ------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v slurmdbd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null; then
  say "installing Debian packages (slurmctld slurmd slurm-client slurmdbd munge mariadb-server)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge \
    mariadb-server >/dev/null
fi

mkdir -p "$STATE"/{ctld,d,log} /etc/slurm /run/munge /run/mysqld /var/log/munge /var/lib/munge

# --- munge ---------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
if ! alive /run/munge/munged.pid; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
  else
    /usr/sbin/munged --force || fail "munged did not start"
  fi
fi

# --- MariaDB for accounting ----------------------------------------------------------------
chown mysql:mysql /run/mysqld 2>/dev/null || true
if [ ! -d /var/lib/mysql/mysql ]; then
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOG/mariadb-install.log" 2>&1 \
    || fail "mariadb-install-db failed"
fi
if ! mariadb-admin ping >/dev/null 2>&1; then
  rm -f /run/mysqld/mysqld.sock /run/mysqld/mysqld.pid
  setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mysqld.pid --skip-networking=0 --bind-address=127.0.0.1 \
    >"$LOG/mariadb.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.5; done
  mariadb-admin ping >/dev/null 2>&1 || fail "MariaDB did not start"
fi
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

# --- configs -------------------------------------------------------------------------------
CPUS=$(nproc); [ "$CPUS" -lt 4 ] && CPUS=4      # room for 2-task jobs and small arrays on 2 cores
MEM=$(( $(free -m | awk '/^Mem:/ {print $2}') * 90 / 100 ))   # higher drains the node
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmdTimeout=300
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
EOF
chmod 600 /etc/slurm/slurmdbd.conf

# --- daemons -------------------------------------------------------------------------------
if ! alive "$STATE/slurmdbd.pid"; then
  slurmdbd || fail "slurmdbd did not start"
  for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
fi
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
if ! alive "$STATE/slurmctld.pid"; then
  slurmctld || fail "slurmctld did not start"
fi
if ! alive "$STATE/slurmd.pid"; then
  slurmd || fail "slurmd did not start"
fi

for _ in $(seq 120); do
  state=$(node_state || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    down|drained|draining|drain) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
[[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]] || fail "node $HOST is '$(node_state)', not idle"
for _ in $(seq 60); do sacct -n -X -S now >/dev/null 2>&1 && break; sleep 0.5; done
echo "slurm cluster ready: partition $PARTITION, node $HOST, state dir $STATE"
