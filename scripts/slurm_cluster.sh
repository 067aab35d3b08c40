#!/usr/bin/env bash
# One-node Slurm cluster with accounting (munged + mariadbd + slurmdbd +
# slurmctld + slurmd), loopback only, no systemd, for test suites.
#
#   slurm_cluster.sh up   STATE_DIR   # start; prints `export SLURM_CONF=...` on stdout
#   slurm_cluster.sh down STATE_DIR   # stop every daemon recorded in STATE_DIR/pids
#   slurm_cluster.sh status STATE_DIR # exit 0 if every daemon is alive
#
# Everything (config, logs, database, state, pid files) lives under STATE_DIR.
# Only stdout carries the `export ...` lines, so `eval "$(slurm_cluster.sh up D)"`
# works; all progress and errors go to stderr.  The same lines are written to
# STATE_DIR/env.sh.
#
# Environment knobs (all optional):
#   SLURM_DEV_CLUSTER   cluster name (default: devcluster)
#   SLURM_DEV_ACCOUNT   account name registered with sacctmgr (default: devacct)
#   SLURM_DEV_USERS     users added to the account (default: root and $SUDO_USER)
#   SLURM_DEV_AS_ROOT=1 run munged/slurmctld/slurmdbd/mariadbd as root even
#                       when the munge/slurm/mysql users could be used
#   SLURM_DEV_CPUS      advertise this many CPUs instead of the real count
#   SLURM_DEV_CRED_EXPIRE  AuthInfo cred_expire, also the delay before a
#                       requeued job may start again (default 15; Slurm's 120)
#   SLURM_DEV_ENFORCE_PART_LIMITS=ALL  reject unsatisfiable jobs at sbatch time
#                       (default NO: they pend forever, Reason=PartitionConfig)
#   SLURM_DEV_TIMEOUT   seconds to wait for each readiness step (default 60)
#   SLURM_DEV_KEEP_ON_FAIL=1  leave the daemons of a failed `up` running
#   SLURM_DEV_NO_INSTALL=1    never apt-get install (exit 3 if commands missing)
#   SLURM_DEV_FAIL_AFTER=NAME test hook: fail right after starting daemon NAME
#
# Exit codes: 0 ok, 1 failure (log tails on stderr), 2 usage, 3 missing
# commands and cannot install (not root / install disabled / install failed).
set -euo pipefail

PROG=$(basename "$0")
DAEMONS_START_ORDER=(munged mariadbd slurmdbd slurmctld slurmd)
DAEMONS_STOP_ORDER=(slurmd slurmctld slurmdbd mariadbd munged)
DEBIAN_PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
TIMEOUT=${SLURM_DEV_TIMEOUT:-60}

log() { printf '[%s %s] %s\n' "$PROG" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { echo "usage: $PROG up|down|status STATE_DIR" >&2; exit 2; }

[[ $# -eq 2 ]] || usage
ACTION=$1
if [[ ! -d $2 ]]; then
  case $ACTION in
  down) echo "$PROG: $2 does not exist, nothing to stop" >&2; exit 0 ;;
  status) echo down; exit 1 ;;
  esac
fi
mkdir -p "$2"
STATE_DIR=$(cd "$2" && pwd -P)
PID_DIR=$STATE_DIR/pids
LOG_DIR=$STATE_DIR/log
CLUSTER=${SLURM_DEV_CLUSTER:-devcluster}
[[ $CLUSTER =~ ^[a-z][a-z0-9_-]*$ ]] || { echo "$PROG: bad SLURM_DEV_CLUSTER '$CLUSTER' (lowercase letters, digits, _ -)" >&2; exit 2; }
ACCOUNT=${SLURM_DEV_ACCOUNT:-devacct}
# Marker put into the environment of the daemons we start (inherited by
# slurmstepd), so `down` can find leftovers of *this* cluster precisely.
TAG="SLURM_DEV_TAG=$(printf '%s' "$STATE_DIR" | md5sum | cut -c1-16)"

# ----------------------------------------------------------------- helpers --
proc_stat() {  # proc_stat PID N -> field N after the command name of /proc/PID/stat (1: the
  # state, 2: the parent); fails if PID is gone. The name, in parentheses, may hold spaces
  # (pytest-xdist's workers: "[pytest-xdist r"), so fields are counted from its last ')'.
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  read -r -a stat <<<"$stat"
  echo "${stat[$(($2 - 1))]}"
}

pid_alive() {  # pid_alive NAME -> 0 if STATE_DIR/pids/NAME.pid is a live NAME process
  local f=$PID_DIR/$1.pid pid
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  # guard against pid reuse: the command line must mention the daemon name
  { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q -- "$1" || return 1
  # a zombie is dead for our purposes
  [[ $(proc_stat "$pid" 1) != Z ]]
}

stop_pid() {  # stop_pid PID LABEL [WAIT_S]: TERM, wait up to WAIT_S (10) s, KILL
  local pid=$1 label=$2 wait_s=${3:-10} i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < wait_s * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || { log "stopped $label (pid $pid)"; return 0; }
    if [[ $(proc_stat "$pid" 1) == Z ]]; then
      log "stopped $label (pid $pid)"; return 0
    fi
    sleep 0.1
  done
  log "$label (pid $pid) ignored TERM for $wait_s s, sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_port() {  # pick_port PREFERRED [EXCLUDED...]
  local p=$1; shift
  local excl=" $* "
  if ! port_in_use "$p" && [[ $excl != *" $p "* ]]; then echo "$p"; return; fi
  local i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 20000))
    if ! port_in_use "$p" && [[ $excl != *" $p "* ]]; then echo "$p"; return; fi
  done
  die "no free loopback port found"
}

wait_for() {  # wait_for DESCRIPTION LOGFILE DAEMON CMD... : poll CMD until success
  local desc=$1 logf=$2 daemon=$3; shift 3
  local deadline=$((SECONDS + TIMEOUT)) out
  while ! out=$("$@" 2>&1); do
    if [[ -n $daemon ]] && ! pid_alive "$daemon"; then
      log "$daemon died while waiting for: $desc"
      show_tail "$logf" "$LOG_DIR/$daemon.stdout"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "timed out after ${TIMEOUT}s waiting for: $desc"
      [[ -n $out ]] && printf 'last output of the check (%s):\n%s\n' "$*" "$(tail -n 5 <<<"$out")" >&2
      show_tail "$logf" "$LOG_DIR/$daemon.stdout"
      return 1
    fi
    sleep 0.3
  done
}

show_tail() {
  local f
  for f in "$@"; do
    [[ -f $f ]] || continue
    echo "----- last 25 lines of $f -----" >&2
    tail -n 25 "$f" >&2 || true
  done
}

start_daemon() {  # start_daemon NAME LOGFILE CMD... : background, no tty, own session
  local name=$1 logf=$2; shift 2
  # setsid execs in place (a background job of a non-interactive shell is not
  # a process-group leader), so $! is the daemon's own pid.
  env "$TAG" SLURM_CONF="$STATE_DIR/slurm.conf" setsid "$@" </dev/null >>"$LOG_DIR/$name.stdout" 2>&1 &
  local pid=$!
  echo "$pid" >"$PID_DIR/$name.pid"
  sleep 0.2
  pid_alive "$name" || { log "$name exited immediately"; show_tail "$logf" "$LOG_DIR/$name.stdout"; return 1; }
  log "started $name (pid $pid)"
  if [[ ${SLURM_DEV_FAIL_AFTER:-} == "$name" ]]; then  # test hook: simulate a failed up
    log "SLURM_DEV_FAIL_AFTER=$name: failing on purpose"; return 1
  fi
}

user_can_reach() {  # user_can_reach USER DIR: USER can traverse every ancestor of DIR
  [[ $1 == root ]] && return 0
  getent passwd "$1" >/dev/null || return 1
  setpriv --reuid="$1" --regid="$1" --init-groups test -x "$2" -a -r "$2" 2>/dev/null
}

first_cmd() { local c; for c in "$@"; do command -v "$c" 2>/dev/null && return 0; done; return 1; }

# ------------------------------------------------------------------- down ---
do_down() {
  mkdir -p "$PID_DIR"
  export SLURM_CONF=$STATE_DIR/slurm.conf
  # 1. cancel jobs while the controller still runs, so job processes die cleanly
  if pid_alive slurmctld && pid_alive munged; then
    local ids
    ids=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${ids// /} ]]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      timeout 10 scancel $ids 2>/dev/null || true
      local deadline=$((SECONDS + 10))
      while ((SECONDS < deadline)) &&
        [[ -n $(timeout 5 squeue -h -t R,CG,S -o %i 2>/dev/null || true) ]]; do
        sleep 0.5
      done
    fi
  fi
  # 2. daemons, compute side first
  local name pid
  for name in "${DAEMONS_STOP_ORDER[@]}"; do
    [[ -f $PID_DIR/$name.pid ]] || continue
    if pid_alive "$name"; then
      stop_pid "$(<"$PID_DIR/$name.pid")" "$name"
    else
      log "$name not running (stale pid file)"
    fi
    rm -f "$PID_DIR/$name.pid"
    # slurmstepd/job processes that outlived slurmd
    if [[ $name == slurmd ]]; then kill_leftovers; fi
  done
  kill_leftovers  # anything else carrying our tag (e.g. slurmscriptd)
  # the short socket dir that `up` made outside STATE_DIR for a long path
  if [[ -L $STATE_DIR/run ]]; then
    local target
    target=$(readlink "$STATE_DIR/run")
    [[ $target == /tmp/slurm-dev.* ]] && rm -rf "$target"
    rm -f "$STATE_DIR/run"
  fi
  rm -f "$STATE_DIR/.up"
  log "down: done"
}

kill_leftovers() {
  # slurmstepd processes inherit $TAG from slurmd; job processes carry our
  # SLURM_CONF together with SLURM_JOB_ID.  Never touch ourselves or ancestors.
  # Daemons still recorded in pid files are stopped by do_down itself.
  local skip=" " p=$$ pid env f e
  while [[ $p -gt 1 ]]; do
    skip+="$p "
    p=$(proc_stat "$p" 2) || p=1
  done
  for f in "$PID_DIR"/*.pid; do [[ -s $f ]] && skip+="$(<"$f") "; done
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    [[ $skip == *" $pid "* ]] && continue
    # children of a still-recorded daemon (slurmctld's slurmscriptd) go with it
    p=$(proc_stat "$pid" 2) || continue
    [[ $skip == *" $p "* ]] && continue
    e=$( { tr '\0' '\n' <"$env"; } 2>/dev/null) || continue
    if grep -qxF "$TAG" <<<"$e" ||
      { grep -qxF "SLURM_CONF=$STATE_DIR/slurm.conf" <<<"$e" && grep -q '^SLURM_JOB_ID=' <<<"$e"; }; then
      log "killing leftover $( { tr '\0' ' ' </proc/"$pid"/cmdline; } 2>/dev/null | cut -c1-60) (pid $pid)"
      stop_pid "$pid" "leftover pid $pid" 3 &
    fi
  done
  wait
}

# ----------------------------------------------------------------- status ---
all_alive() {
  local name
  for name in "${DAEMONS_START_ORDER[@]}"; do pid_alive "$name" || return 1; done
}
any_pidfile() {
  local name
  for name in "${DAEMONS_START_ORDER[@]}"; do [[ -f $PID_DIR/$name.pid ]] && return 0; done
  return 1
}
print_env() {
  printf 'export SLURM_CONF=%q\n' "$STATE_DIR/slurm.conf"
}

# ---------------------------------------------------------------- install ---
ensure_commands() {
  local missing=() c
  for c in munged slurmctld slurmd slurmdbd sbatch sacct sacctmgr sinfo squeue scontrol scancel; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
  done
  first_cmd mariadbd mysqld /usr/sbin/mariadbd /usr/sbin/mysqld >/dev/null || missing+=(mariadbd)
  first_cmd mariadb-install-db mysql_install_db >/dev/null || missing+=(mariadb-install-db)
  first_cmd mariadb mysql >/dev/null || missing+=(mariadb)
  ((${#missing[@]} == 0)) && return 0
  if [[ ${SLURM_DEV_NO_INSTALL:-0} == 1 ]]; then
    echo "$PROG: missing commands (${missing[*]}) and SLURM_DEV_NO_INSTALL=1" >&2; exit 3
  fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "$PROG: missing commands (${missing[*]}); install needs root (apt-get install ${DEBIAN_PACKAGES[*]})" >&2; exit 3
  fi
  command -v apt-get >/dev/null || { echo "$PROG: missing commands (${missing[*]}) and no apt-get" >&2; exit 3; }
  log "missing: ${missing[*]}; installing ${DEBIAN_PACKAGES[*]}"
  local t0=$SECONDS made_policy=0
  # keep maintainer scripts from starting the system's services
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  local ok=0 aptlog=$LOG_DIR/apt.log
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y -q --no-install-recommends "${DEBIAN_PACKAGES[@]}" >"$aptlog" 2>&1; then ok=1
  else
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q >>"$aptlog" 2>&1 || true
    apt-get install -y -q --no-install-recommends "${DEBIAN_PACKAGES[@]}" >>"$aptlog" 2>&1 && ok=1
  fi
  ((made_policy)) && rm -f /usr/sbin/policy-rc.d
  if ((!ok)); then
    tail -n 15 "$aptlog" >&2
    echo "$PROG: apt-get install ${DEBIAN_PACKAGES[*]} failed (see $aptlog)" >&2; exit 3
  fi
  log "packages installed in $((SECONDS - t0)) s"
  hash -r
}

# --------------------------------------------------------------------- up ---
do_up() {
  mkdir -p "$PID_DIR" "$LOG_DIR"
  if [[ -f $STATE_DIR/.up ]] && all_alive; then
    log "already up ($STATE_DIR)"
    print_env
    return 0
  fi
  if any_pidfile; then
    log "partially up or stale pid files; stopping leftovers first"
    do_down
  fi
  local t_start=$SECONDS
  if [[ $(id -u) -ne 0 ]]; then
    echo "$PROG: up must run as root (chown to the service users, slurmd runs as root)" >&2; exit 3
  fi
  ensure_commands

  local MARIADBD INSTALL_DB MYSQL
  MARIADBD=$(first_cmd mariadbd mysqld /usr/sbin/mariadbd /usr/sbin/mysqld)
  INSTALL_DB=$(first_cmd mariadb-install-db mysql_install_db)
  MYSQL=$(first_cmd mariadb mysql)

  # --- users: the packages' service users when they can reach STATE_DIR
  local MUNGE_USER=munge SLURM_USER=slurm MYSQL_USER=mysql u
  for u in MUNGE_USER SLURM_USER MYSQL_USER; do
    if [[ ${SLURM_DEV_AS_ROOT:-0} == 1 ]] || ! user_can_reach "${!u}" "$STATE_DIR"; then
      [[ ${SLURM_DEV_AS_ROOT:-0} == 1 ]] || log "user ${!u} cannot reach $STATE_DIR (or does not exist); running its daemon as root"
      printf -v "$u" root
    fi
  done

  # --- directories.  Unix sockets (munge, mysqld, slurmstepd in SlurmdSpoolDir)
  # need short paths (<108 bytes), so they go to a short run dir when needed.
  local RUN_DIR=$STATE_DIR/run
  if ((${#RUN_DIR} > 60)); then
    local short
    short=/tmp/slurm-dev.$(printf '%s' "$STATE_DIR" | md5sum | cut -c1-10)
    mkdir -p "$short"; chmod 755 "$short"
    ln -sfn "$short" "$RUN_DIR"
    RUN_DIR=$short
  else
    [[ -L $RUN_DIR ]] && rm -f "$RUN_DIR"
    mkdir -p "$RUN_DIR"
  fi
  local MUNGE_DIR=$STATE_DIR/munge SOCK_DIR=$RUN_DIR/munge DB_DIR=$STATE_DIR/mysql
  local CTLD_DIR=$STATE_DIR/slurmctld SPOOL_DIR=$RUN_DIR/slurmd DBD_DIR=$STATE_DIR/slurmdbd
  mkdir -p "$MUNGE_DIR" "$SOCK_DIR" "$RUN_DIR/mysql" "$DB_DIR/data" "$CTLD_DIR" "$SPOOL_DIR" "$DBD_DIR" "$STATE_DIR/jobs"
  chmod 755 "$STATE_DIR" "$RUN_DIR" "$LOG_DIR"
  chmod 700 "$MUNGE_DIR"; chmod 755 "$SOCK_DIR"
  chown -R "$MUNGE_USER:" "$MUNGE_DIR" "$SOCK_DIR"
  chown -R "$MYSQL_USER:" "$DB_DIR" "$RUN_DIR/mysql"
  chown -R "$SLURM_USER:" "$CTLD_DIR" "$DBD_DIR"
  local f
  for f in munged mariadbd slurmdbd slurmctld slurmd; do touch "$LOG_DIR/$f.log"; done
  chown "$MUNGE_USER:" "$LOG_DIR/munged.log"
  chown "$MYSQL_USER:" "$LOG_DIR/mariadbd.log"
  chown "$SLURM_USER:" "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmctld.log"

  # --- ports (loopback)
  local P_CTLD P_SLURMD P_DBD P_DB
  P_CTLD=$(pick_port 6817)
  P_SLURMD=$(pick_port 6818 "$P_CTLD")
  P_DBD=$(pick_port 6819 "$P_CTLD" "$P_SLURMD")
  P_DB=$(pick_port 3306 "$P_CTLD" "$P_SLURMD" "$P_DBD")

  # --- munge key: the system key if there is one, else a private random key
  local KEY=$MUNGE_DIR/munge.key
  if [[ ! -s $KEY ]]; then
    if [[ -r /etc/munge/munge.key ]]; then
      cp /etc/munge/munge.key "$KEY"
    elif command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$KEY" --force >/dev/null 2>&1 || dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
    else
      dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
    fi
  fi
  chown "$MUNGE_USER:" "$KEY"; chmod 400 "$KEY"
  local MUNGE_SOCKET=$SOCK_DIR/munge.socket.2

  # --- hardware
  local real_cpus real_mem mem CPUS NODE_HW
  real_cpus=$(nproc --all)
  real_mem=$(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo)
  mem=$((real_mem - (real_mem / 20 < 1024 ? real_mem / 20 : 1024)))
  CPUS=${SLURM_DEV_CPUS:-$real_cpus}
  local SLURMD_PARAMS=""
  if [[ -n ${SLURM_DEV_CPUS:-} && $SLURM_DEV_CPUS != "$real_cpus" ]]; then
    SLURMD_PARAMS="SlurmdParameters=config_overrides"
    NODE_HW="CPUs=$CPUS"
  else
    # the real topology, so slurmd's registration matches exactly
    printf 'ClusterName=probe\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost\n' \
      >"$STATE_DIR/probe.conf"
    NODE_HW=$(slurmd -C -f "$STATE_DIR/probe.conf" 2>/dev/null | head -n1 | tr ' ' '\n' |
      grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ' || true)
    rm -f "$STATE_DIR/probe.conf"
    [[ $NODE_HW == *CPUs=* ]] || NODE_HW="CPUs=$CPUS"
  fi

  # --- listening addresses.  NoInAddrAny/NoCtldInAddrAny make the daemons bind
  # the address the *hostname* resolves to instead of 0.0.0.0; only safe (and
  # only loopback) when the hostname resolves to 127.x.
  local COMM_PARAMS="# hostname does not resolve to loopback: daemons bind 0.0.0.0 (contacted via 127.0.0.1 only)"
  local host_addr
  host_addr=$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk 'NR==1{print $1}')
  if [[ $host_addr == 127.* ]]; then
    COMM_PARAMS="# hostname resolves to $host_addr: bind that, not 0.0.0.0
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"
  fi

  local CRED_EXPIRE=${SLURM_DEV_CRED_EXPIRE:-15}

  # --- slurm.conf
  cat >"$STATE_DIR/slurm.conf" <<EOF
# generated by $PROG for $STATE_DIR
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$P_CTLD
SlurmdPort=$P_SLURMD
SlurmUser=$SLURM_USER
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays the restart of a requeued job (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
CredType=cred/munge
$COMM_PARAMS
StateSaveLocation=$CTLD_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_DIR/slurmctld.pid
SlurmdPidFile=$SPOOL_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
$SLURMD_PARAMS
# requeue (submitit: --signal=USR2@90, then scontrol requeue from the job)
JobRequeue=1
# fast turnaround
MinJobAge=5
KillWait=2
OverTimeLimit=0
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmctldTimeout=60
SlurmdTimeout=60
BatchStartTimeout=10
CompleteWait=0
UnkillableStepTimeout=30
# scheduling
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,bf_continue
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PriorityType=priority/basic
# NO (Slurm's default): a job asking more CPUs than the node has is accepted
# and pends forever (Reason=PartitionConfig); ALL: sbatch rejects it
EnforcePartLimits=${SLURM_DEV_ENFORCE_PART_LIMITS:-NO}
# accounting: sacct (used by submitit) needs slurmdbd
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$P_DBD
# munge socket for the slurmdbd connection (AuthInfo is not used for it)
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
# nodes / partitions
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost $NODE_HW RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 644 "$STATE_DIR/slurm.conf"

  # --- mariadb
  local DBPASS
  if [[ -s $DB_DIR/.slurm_pass ]]; then DBPASS=$(<"$DB_DIR/.slurm_pass")
  else
    DBPASS=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
    (umask 077; printf '%s' "$DBPASS" >"$DB_DIR/.slurm_pass")
  fi
  cat >"$DB_DIR/my.cnf" <<EOF
[mysqld]
datadir=$DB_DIR/data
socket=$RUN_DIR/mysql/mysqld.sock
pid-file=$DB_DIR/mariadbd.pid
log-error=$LOG_DIR/mariadbd.log
port=$P_DB
bind-address=127.0.0.1
user=$MYSQL_USER
skip-name-resolve
skip-log-bin
innodb_buffer_pool_size=128M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
innodb_use_native_aio=0
max_connections=50
[client]
socket=$RUN_DIR/mysql/mysqld.sock
user=root
EOF
  chmod 644 "$DB_DIR/my.cnf"
  if [[ ! -d $DB_DIR/data/mysql ]]; then
    log "initialising mariadb datadir"
    "$INSTALL_DB" --defaults-file="$DB_DIR/my.cnf" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG_DIR/mariadb-install-db.log" 2>&1 ||
      { show_tail "$LOG_DIR/mariadb-install-db.log"; return 1; }
  fi

  # --- slurmdbd.conf (must be owned by SlurmUser, mode 600)
  cat >"$STATE_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$P_DBD
SlurmUser=$SLURM_USER
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$DBD_DIR/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$P_DB
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
  chown "$SLURM_USER:" "$STATE_DIR/slurmdbd.conf"; chmod 600 "$STATE_DIR/slurmdbd.conf"

  export SLURM_CONF=$STATE_DIR/slurm.conf

  # --- start the daemons
  # munged: foreground, private socket/key/log
  local -a munged_cmd=(munged --foreground --socket="$MUNGE_SOCKET" --key-file="$KEY"
    --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed"
    --log-file="$LOG_DIR/munged.log")
  [[ $MUNGE_USER == root ]] && munged_cmd+=(--force)
  if [[ $MUNGE_USER != root ]]; then
    munged_cmd=(setpriv --reuid="$MUNGE_USER" --regid="$MUNGE_USER" --init-groups "${munged_cmd[@]}")
  fi
  start_daemon munged "$LOG_DIR/munged.log" "${munged_cmd[@]}"
  wait_for "munge socket" "$LOG_DIR/munged.log" munged \
    bash -c "munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'"

  start_daemon mariadbd "$LOG_DIR/mariadbd.log" "$MARIADBD" --defaults-file="$DB_DIR/my.cnf"
  wait_for "mariadb on 127.0.0.1:$P_DB" "$LOG_DIR/mariadbd.log" mariadbd \
    "$MYSQL" --defaults-file="$DB_DIR/my.cnf" -e 'SELECT 1'
  "$MYSQL" --defaults-file="$DB_DIR/my.cnf" <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

  start_daemon slurmdbd "$LOG_DIR/slurmdbd.log" slurmdbd -D
  wait_for "slurmdbd answering sacctmgr" "$LOG_DIR/slurmdbd.log" slurmdbd \
    timeout 10 sacctmgr -n list cluster

  # register the cluster before slurmctld connects
  if ! timeout 20 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    timeout 20 sacctmgr -i add cluster "$CLUSTER" >&2
  fi

  start_daemon slurmctld "$LOG_DIR/slurmctld.log" slurmctld -D -f "$STATE_DIR/slurm.conf"
  wait_for "slurmctld answering" "$LOG_DIR/slurmctld.log" slurmctld timeout 10 scontrol ping

  start_daemon slurmd "$LOG_DIR/slurmd.log" slurmd -D -N localhost -f "$STATE_DIR/slurm.conf"

  # account + users so jobs map to an association
  if ! timeout 20 sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
    timeout 20 sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=dev Organization=dev >&2
  fi
  local users="root ${SUDO_USER:-}" user
  users=${SLURM_DEV_USERS:-$users}
  for user in $users; do
    if ! timeout 20 sacctmgr -n -P list assoc cluster="$CLUSTER" account="$ACCOUNT" user="$user" format=user | grep -qx "$user"; then
      timeout 20 sacctmgr -i add user "$user" Account="$ACCOUNT" Cluster="$CLUSTER" >&2
    fi
  done

  node_idle() { [[ $(sinfo -h -o %T 2>/dev/null) == idle ]]; }
  wait_for "node localhost idle (sinfo -h -o %T)" "$LOG_DIR/slurmd.log" slurmd node_idle || {
    show_tail "$LOG_DIR/slurmctld.log"; return 1; }
  cluster_listed() { timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; }
  wait_for "sacctmgr lists cluster $CLUSTER" "$LOG_DIR/slurmdbd.log" slurmdbd cluster_listed
  # slurmctld must have registered with slurmdbd (ControlHost filled in)
  ctld_registered() { [[ -n $(timeout 10 sacctmgr -n -P list cluster "$CLUSTER" format=controlhost) ]]; }
  wait_for "slurmctld registered with slurmdbd" "$LOG_DIR/slurmctld.log" slurmctld ctld_registered

  : >"$STATE_DIR/.up"
  print_env >"$STATE_DIR/env.sh"
  log "up in $((SECONDS - t_start)) s: cluster $CLUSTER, CPUs=$CPUS RealMemory=$mem," \
    "ports ctld=$P_CTLD slurmd=$P_SLURMD dbd=$P_DBD db=$P_DB, users munge=$MUNGE_USER slurm=$SLURM_USER mysql=$MYSQL_USER"
  print_env
}

on_up_error() {
  local rc=$?
  trap - ERR EXIT
  ((rc == 0)) && return 0
  ((rc == 3)) && exit 3
  log "up failed (rc=$rc); logs in $LOG_DIR"
  if [[ ${SLURM_DEV_KEEP_ON_FAIL:-0} == 1 ]]; then
    log "SLURM_DEV_KEEP_ON_FAIL=1: leaving started daemons; run '$PROG down $STATE_DIR'"
  else
    do_down || true
  fi
  exit 1
}

case $ACTION in
up)
  trap on_up_error EXIT
  do_up
  trap - EXIT
  ;;
down) do_down ;;
status)
  if [[ -f $STATE_DIR/.up ]] && all_alive; then echo up; exit 0; fi
  echo down; exit 1
  ;;
*) usage ;;
esac
