# Sourced by start-cluster.sh and stop-cluster.sh.
# pid_is NAME PID: PID is a live process called NAME. A pid left over from before a restart may
# belong to something else now, and a killed daemon may linger as a zombie for a while.
pid_is() {
  local stat
  [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ] || return 1
  stat=$(cat "/proc/$2/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ "${stat%% *}" != [ZX] ]]
}
