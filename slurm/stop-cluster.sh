#!/usr/bin/env bash
# Stop the local cluster started by slurm/start-cluster.sh, by PID. Idempotent.
set -u
STATE=${FTLIB_SLURM_DIR:-/var/tmp/ftlib-slurm}
stop() {
  local pidfile=$1
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}
stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
stop "$STATE/slurmdbd.pid"
stop /run/mysqld/mysqld.pid
stop /run/munge/munged.pid
echo "slurm cluster stopped"
