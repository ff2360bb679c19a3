#!/usr/bin/env bash
# Start a real one-node Slurm 22.05 cluster with accounting on this machine, for development and
# CI: munged, MariaDB, slurmdbd, slurmctld, slurmd, started by hand (no systemd needed). Installs
# the Debian 12 packages first if they are missing. Run as root.
#
#   bash slurm/start-cluster.sh      # prints: slurm cluster ready: partition debug, node <host>, state dir <dir>
#   bash slurm/stop-cluster.sh
#
# Idempotent: when everything is up it checks the pid files and the node state and returns in well
# under a second, changing nothing. After a machine restart (stale pid files, sockets, locks) it
# comes back with the jobs and accounting records it had.
#
# Everything lives under one state dir, ${FTLIB_SLURM_DIR:-/var/tmp/ftlib-slurm}:
#   etc/    generated slurm.conf, slurmdbd.conf (installed into /etc/slurm/, where the daemons and
#           sbatch/sacct/submitit read them) and mariadb.cnf (used in place)
#   log/    one log per daemon; read these when something does not come up
#   run/    pid files of the slurm daemons        spool/   slurmctld state, slurmd spool
#   munge/  munged pid and seed (munge's socket stays at its default /run/munge/munge.socket.2)
#   mariadb/ the accounting database (datadir, socket, pid)
# Delete the whole state dir (after stop-cluster.sh) to start from nothing: job ids restart at 1.
#
# Environment: FTLIB_SLURM_DIR, FTLIB_SLURM_PARTITION (debug), FTLIB_SLURM_DB_PORT (3307),
# FTLIB_SLURM_TIMEOUT (seconds to wait for the node, 120).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

STATE=${FTLIB_SLURM_DIR:-/var/tmp/ftlib-slurm}
PARTITION=${FTLIB_SLURM_PARTITION:-debug}
DB_PORT=${FTLIB_SLURM_DB_PORT:-3307}
TIMEOUT=${FTLIB_SLURM_TIMEOUT:-120}
CLUSTER=ftlib
ACCOUNT=ftlib
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOST=$(hostname -s 2>/dev/null || uname -n)
HOST=${HOST%%.*}
LOG=$STATE/log

say() { echo "start-cluster: $*" >&2; }
fail() {  # fail MESSAGE LOGFILE
  say "ERROR: $1"
  if [ -n "${2:-}" ]; then
    say "read $2 (last lines below)"
    tail -n 15 "$2" 2>/dev/null | sed 's/^/    /' >&2 || true
  fi
  exit 1
}
. "$(dirname "${BASH_SOURCE[0]}")/pid.sh"   # pid_is NAME PID
running() {  # running NAME PIDFILE: the pid file names a live NAME
  local pid
  pid=$(cat "$2" 2>/dev/null) && [ -n "$pid" ] && pid_is "$1" "$pid"
}
# wait_for SECONDS CMD...: retry CMD every 0.2 s
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
# wait_daemon NAME PIDFILE SECONDS LOG CMD...: wait until CMD succeeds; fail (naming LOG) when it
# does not within SECONDS, or at once when the daemon has exited (no live pid file after 15 s).
wait_daemon() {
  local name=$1 pidfile=$2 log=$4 start=$SECONDS deadline=$((SECONDS + $3)); shift 4
  until "$@" >/dev/null 2>&1; do
    if [ $((SECONDS - start)) -ge 15 ] && ! running "$name" "$pidfile"; then
      fail "$name exited during startup" "$log"
    fi
    [ "$SECONDS" -lt "$deadline" ] || fail "$name did not answer within $3 s" "$log"
    sleep 0.2
  done
}
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }
node_ready() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing|planned)$ ]]; }

ready_line="slurm cluster ready: partition $PARTITION, node $HOST, state dir $STATE"
if [ "$(id -u)" != 0 ]; then
  # Users other than root can ask whether it is up; starting it needs root.
  if command -v sinfo >/dev/null && node_ready; then echo "$ready_line"; exit 0; fi
  fail "the cluster is not up; start it as root (sudo bash $0): it installs packages and starts system daemons"
fi

# --- generated configs ----------------------------------------------------------------------
CPUS=$(nproc)
[ "$CPUS" -ge 4 ] || CPUS=4     # room for 2-task jobs and small arrays on a 2-core machine
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
REAL_MEMORY=$(( MEM_MB * 90 / 100 ))   # declaring more than the node has drains it
mkdir -p "$STATE/etc"
chmod 0755 "$STATE" "$STATE/etc"
if [ ! -s "$STATE/etc/db.pass" ]; then
  (umask 077; head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9' >"$STATE/etc/db.pass")
fi
DB_PASS=$(cat "$STATE/etc/db.pass")

render() {  # render TEMPLATE: print it with @VARS@ substituted
  local text
  text=$(<"$HERE/$1")
  text=${text//@HOST@/$HOST}
  text=${text//@CPUS@/$CPUS}
  text=${text//@REAL_MEMORY@/$REAL_MEMORY}
  text=${text//@STATE_DIR@/$STATE}
  text=${text//@CLUSTER@/$CLUSTER}
  text=${text//@PARTITION@/$PARTITION}
  text=${text//@DB_PORT@/$DB_PORT}
  text=${text//@DB_PASS@/$DB_PASS}
  printf '%s\n' "$text"
}
SLURM_CONF_TEXT=$(render slurm.conf.in)
SLURMDBD_CONF_TEXT=$(render slurmdbd.conf.in)
MARIADB_CNF_TEXT=$(render mariadb.cnf.in)
same() { [ -f "$1" ] && [ "$(<"$1")" = "$2" ]; }   # same FILE TEXT
configs_current() {
  same /etc/slurm/slurm.conf "$SLURM_CONF_TEXT" && same /etc/slurm/slurmdbd.conf "$SLURMDBD_CONF_TEXT" \
    && same "$STATE/etc/mariadb.cnf" "$MARIADB_CNF_TEXT"
}

# --- fast path: everything up, nothing to change ----------------------------------------------
if command -v sinfo >/dev/null && configs_current \
   && running munged "$STATE/munge/munged.pid" && running mariadbd "$STATE/mariadb/mariadbd.pid" \
   && running slurmdbd "$STATE/run/slurmdbd.pid" && running slurmctld "$STATE/run/slurmctld.pid" \
   && running slurmd "$STATE/run/slurmd.pid" && node_ready; then
  echo "$ready_line"
  exit 0
fi
T0=$SECONDS

# --- packages -----------------------------------------------------------------------------------
missing=()
for cmd in munged mungekey mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct sacctmgr; do
  command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing slurmctld slurmd slurm-client slurmdbd munge mariadb-server (missing: ${missing[*]})"
  # Keep the packages' own init scripts from starting daemons with their default configs.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$LOG"
  { apt-get -o DPkg::Lock::Timeout=300 update -q \
    && apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends \
      slurmctld slurmd slurm-client slurmdbd munge mariadb-server; } >"$LOG/apt-install.log" 2>&1 \
    || { [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d; fail "apt-get install failed" "$LOG/apt-install.log"; }
  [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  say "installed packages in $((SECONDS - T0)) s"
fi

# --- a cluster started by the first version of this script (pid files at the top of the state dir)
if [ -e "$STATE/slurmctld.pid" ] || [ -e "$STATE/slurmd.pid" ] || [ -e "$STATE/slurmdbd.pid" ]; then
  say "stopping a cluster started by an older start-cluster.sh (pid files directly in $STATE)"
  bash "$HERE/stop-cluster.sh" >&2
fi

# --- directories, configs -------------------------------------------------------------------------
mkdir -p "$LOG" "$STATE/run" "$STATE/spool/slurmctld" "$STATE/spool/slurmd" /etc/slurm
install -d -o munge -g munge -m 0700 "$STATE/munge"
install -d -o munge -g munge -m 0755 /run/munge
install -d -o mysql -g mysql -m 0750 "$STATE/mariadb"
for f in munged.log; do touch "$LOG/$f"; chown munge:munge "$LOG/$f"; chmod 0640 "$LOG/$f"; done
for f in mariadbd.log; do touch "$LOG/$f"; chown mysql:mysql "$LOG/$f"; chmod 0640 "$LOG/$f"; done

# install_conf FILE TEXT MODE: write FILE only when its content changes; true when it changed
install_conf() {
  same "$1" "$2" && return 1
  local tmp="$1.tmp.$$"
  (umask 077; printf '%s\n' "$2" >"$tmp")
  chmod "$3" "$tmp"
  mv -f "$tmp" "$1"
}
slurm_conf_changed=0; dbd_conf_changed=0; db_conf_changed=0
# slurm.conf includes this file (see the template); it must exist before any slurm command runs.
[ -e "$STATE/etc/first-job-id.conf" ] || echo "FirstJobId=1" >"$STATE/etc/first-job-id.conf"
chmod 0644 "$STATE/etc/first-job-id.conf"
printf '%s\n' "$SLURM_CONF_TEXT" >"$STATE/etc/slurm.conf"
(umask 077; printf '%s\n' "$SLURMDBD_CONF_TEXT" >"$STATE/etc/slurmdbd.conf")
install_conf /etc/slurm/slurm.conf "$SLURM_CONF_TEXT" 0644 && slurm_conf_changed=1
install_conf /etc/slurm/slurmdbd.conf "$SLURMDBD_CONF_TEXT" 0600 && dbd_conf_changed=1
install_conf "$STATE/etc/mariadb.cnf" "$MARIADB_CNF_TEXT" 0644 && db_conf_changed=1

# stop_if NAME PIDFILE: stop a running daemon whose config just changed
stop_if() {
  running "$1" "$2" || return 0
  say "config changed: restarting $1"
  local pid i
  pid=$(cat "$2")
  kill "$pid"
  for ((i = 0; i < 150; i++)); do running "$1" "$2" || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}
[ "$db_conf_changed" = 0 ] || stop_if mariadbd "$STATE/mariadb/mariadbd.pid"
[ "$dbd_conf_changed" = 0 ] || stop_if slurmdbd "$STATE/run/slurmdbd.pid"
if [ "$slurm_conf_changed" = 1 ]; then
  stop_if slurmd "$STATE/run/slurmd.pid"
  stop_if slurmctld "$STATE/run/slurmctld.pid"
fi

# srun and slurmd look the host name up; a fresh container may not have it in /etc/hosts.
if ! getent hosts "$HOST" >/dev/null; then
  say "adding '127.0.0.1 $HOST' to /etc/hosts"
  echo "127.0.0.1 $HOST  # added by ftlib slurm/start-cluster.sh" >>/etc/hosts
fi

# --- munge ------------------------------------------------------------------------------------
munge_works() { { munge -n </dev/null | unmunge; } >/dev/null 2>&1; }
if [ ! -s /etc/munge/munge.key ]; then
  install -d -o munge -g munge -m 0700 /etc/munge
  runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
fi
if ! running munged "$STATE/munge/munged.pid"; then
  if munge_works; then
    say "using the munged that is already running on /run/munge/munge.socket.2"
  else
    rm -f "$STATE/munge/munged.pid" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid" --log-file="$LOG/munged.log" \
      --seed-file="$STATE/munge/munged.seed" </dev/null >>"$LOG/munged.log" 2>&1 \
      || fail "munged did not start" "$LOG/munged.log"
  fi
fi
wait_for 20 munge_works || fail "munge does not work" "$LOG/munged.log"

# --- MariaDB (accounting storage) ----------------------------------------------------------------
MYCNF=$STATE/etc/mariadb.cnf
if [ ! -d "$STATE/mariadb/data/mysql" ]; then
  say "creating the accounting database in $STATE/mariadb/data"
  rm -rf "$STATE/mariadb/data"
  mariadb-install-db --defaults-file="$MYCNF" --user=mysql --auth-root-authentication-method=socket \
    --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed" "$LOG/mariadb-install.log"
  # A new database knows no jobs: start slurmctld's state afresh too, or job ids would repeat.
  rm -rf "$STATE/spool/slurmctld" && mkdir -p "$STATE/spool/slurmctld"
fi
db_ping() { mariadb-admin --defaults-file="$MYCNF" ping; }
if ! running mariadbd "$STATE/mariadb/mariadbd.pid"; then
  rm -f "$STATE/mariadb/mariadbd.pid" "$STATE/mariadb/mariadbd.sock" "$STATE/mariadb/mariadbd.sock.lock"
  tcp_open "$DB_PORT" && fail "port $DB_PORT is taken by another program; set FTLIB_SLURM_DB_PORT"
  setsid mariadbd --defaults-file="$MYCNF" </dev/null >>"$LOG/mariadbd.log" 2>&1 &
fi
wait_daemon mariadbd "$STATE/mariadb/mariadbd.pid" 60 "$LOG/mariadbd.log" db_ping
mariadb --defaults-file="$MYCNF" -uroot -e "
  CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
  ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
  || fail "could not create the slurm database user" "$LOG/mariadbd.log"

# --- slurmdbd ---------------------------------------------------------------------------------------
if ! running slurmdbd "$STATE/run/slurmdbd.pid"; then
  rm -f "$STATE/run/slurmdbd.pid"
  slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1 || fail "slurmdbd did not start" "$LOG/slurmdbd.log"
fi
wait_daemon slurmdbd "$STATE/run/slurmdbd.pid" 60 "$LOG/slurmdbd.log" sacctmgr -n -P list cluster

# Register the cluster (before slurmctld connects), an account, and root plus the sudo user in it.
assocs=$(sacctmgr -n -P list associations format=cluster,account,user 2>/dev/null || true)
if ! grep -q "^$CLUSTER|" <<<"$assocs"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster failed" "$LOG/slurmdbd.log"
fi
if ! grep -q "^$CLUSTER|$ACCOUNT|$" <<<"$assocs"; then
  sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="ftlib development and CI" \
    organization=ftlib >/dev/null || fail "sacctmgr add account failed" "$LOG/slurmdbd.log"
fi
for user in root ${SUDO_USER:-}; do
  if ! grep -q "^$CLUSTER|$ACCOUNT|$user$" <<<"$assocs"; then
    sacctmgr -i add user "$user" account="$ACCOUNT" cluster="$CLUSTER" >/dev/null \
      || fail "sacctmgr add user $user failed" "$LOG/slurmdbd.log"
  fi
done

# --- slurmctld, slurmd ------------------------------------------------------------------------------
unclean=0
if ! running slurmctld "$STATE/run/slurmctld.pid"; then
  # A pid file left behind means slurmctld did not shut down cleanly (crash, kill -9, power loss).
  [ ! -e "$STATE/run/slurmctld.pid" ] || unclean=1
  rm -f "$STATE/run/slurmctld.pid"
  slurmctld </dev/null >>"$LOG/slurmctld.log" 2>&1 || fail "slurmctld did not start" "$LOG/slurmctld.log"
fi
wait_daemon slurmctld "$STATE/run/slurmctld.pid" 60 "$LOG/slurmctld.log" scontrol ping
if [ "$unclean" = 1 ]; then
  # The state it saved before the crash may predate its last jobs, so it would hand out job ids
  # again whose records sacct already has, or will get when slurmctld replays the accounting
  # messages it had queued (sacct -j would then answer for the old job). Skip well past the
  # highest id in the database: measured, a replay can land a second after the queue looks empty.
  dbd_queue_empty() { [ "$(sdiag 2>/dev/null | awk -F: '/DBD Agent queue size/ {print $2 + 0}')" = 0 ]; }
  wait_for 30 dbd_queue_empty || true
  max_id=$(sacct -a -X -n -P -o JobIDRaw -S 1970-01-01T00:00:00 -E now 2>/dev/null \
    | awk -F'[_+]' '$1 + 0 > m {m = $1 + 0} END {print m + 0}')
  first_id=$(( (max_id / 1000 + 1) * 1000 ))
  echo "FirstJobId=$first_id" >"$STATE/etc/first-job-id.conf"
  # FirstJobId raises the next job id on a reconfigure, not when state is recovered at startup.
  scontrol reconfigure >/dev/null || fail "scontrol reconfigure failed" "$LOG/slurmctld.log"
  say "slurmctld had not shut down cleanly: new job ids start at $first_id (highest in sacct: $max_id)"
fi
if ! running slurmd "$STATE/run/slurmd.pid"; then
  rm -f "$STATE/run/slurmd.pid"
  slurmd </dev/null >>"$LOG/slurmd.log" 2>&1 || fail "slurmd did not start" "$LOG/slurmd.log"
fi

slurmd_started=$SECONDS; deadline=$((SECONDS + TIMEOUT)); resumed=0
until node_ready; do
  state=$(node_state)
  if [ "$SECONDS" -ge "$deadline" ]; then
    fail "node $HOST is '${state:-unknown}', not idle, after ${TIMEOUT} s; slurmctld's view: $LOG/slurmctld.log" \
      "$LOG/slurmd.log"
  fi
  if [ $((SECONDS - slurmd_started)) -ge 15 ] && ! running slurmd "$STATE/run/slurmd.pid"; then
    fail "slurmd exited" "$LOG/slurmd.log"
  fi
  # A node left down or drained in the saved state (e.g. it stopped responding before a restart).
  if [ "$resumed" = 0 ] && [[ "$state" =~ ^(down|drained|draining)$ ]]; then
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    resumed=1
  fi
  sleep 0.2
done
say "up in $((SECONDS - T0)) s"
echo "$ready_line"
