#!/usr/bin/env bash
# Stop the one-node Slurm cluster started by slurm/start-cluster.sh: each daemon by the PID in its
# pid file (slurmd, slurmctld, slurmdbd, MariaDB, munged, in that order), SIGTERM first and SIGKILL
# after 30 s. Idempotent: daemons that are not running are skipped. Running job steps are left
# alone; slurmd picks them up again when the cluster is started again. State is kept.
set -uo pipefail
STATE=${FTLIB_SLURM_DIR:-/var/tmp/ftlib-slurm}

. "$(dirname "${BASH_SOURCE[0]}")/pid.sh"   # pid_is NAME PID

# stop NAME PIDFILE: stop the process named NAME whose pid is in PIDFILE, if it is still that process
stop() {
  local name=$1 pidfile=$2 pid i
  pid=$(cat "$pidfile" 2>/dev/null) || return 0
  if [ -n "$pid" ] && pid_is "$name" "$pid"; then
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 150; i++)); do
      pid_is "$name" "$pid" || break
      sleep 0.2
    done
    if pid_is "$name" "$pid"; then
      echo "stop-cluster: $name (pid $pid) ignored SIGTERM for 30 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
    echo "stop-cluster: stopped $name (pid $pid)" >&2
  fi
  rm -f "$pidfile"
}

if [ -e "$STATE/slurmctld.pid" ] || [ -e "$STATE/slurmd.pid" ] || [ -e "$STATE/slurmdbd.pid" ]; then
  # Pid file places of the first version of start-cluster.sh.
  stop slurmd "$STATE/slurmd.pid"
  stop slurmctld "$STATE/slurmctld.pid"
  stop slurmdbd "$STATE/slurmdbd.pid"
  stop mariadbd /run/mysqld/mysqld.pid
  stop munged /run/munge/munged.pid
fi
stop slurmd "$STATE/run/slurmd.pid"
stop slurmctld "$STATE/run/slurmctld.pid"
stop slurmdbd "$STATE/run/slurmdbd.pid"
stop mariadbd "$STATE/mariadb/mariadbd.pid"
stop munged "$STATE/munge/munged.pid"
echo "slurm cluster stopped (state kept in $STATE)"
