#!/bin/bash
# kforge-sidecar Epilog: drain and stop the sidecar that prolog.sh (beside this file)
# started for the job on this node, then remove its socket directory.
#
#   slurm.conf:  Epilog=/etc/slurm/kforge-sidecar/epilog.sh
#
# Runs as root. Sends SIGTERM (as the job's user, so a pid can only ever reach that
# user's own processes) to the process holding the socket's lock: the sidecar drains,
# handing wandb what is spooled, and exits. Waits for that up to
# KFORGE_DRAIN_TIMEOUT + 15 s, then kills what is left (frames stay in the spool for
# `kforge-sidecar sync`). The node stays COMPLETING meanwhile: keep the drain timeout
# under your PrologEpilogTimeout. ALWAYS exits 0 (a failing Epilog drains the node).
# Settings: as in prolog.sh.
set -u

log() {
    logger -t kforge-sidecar -- "epilog job ${SLURM_JOB_ID:-?}: $*" 2>/dev/null \
        || echo "kforge-sidecar epilog job ${SLURM_JOB_ID:-?}: $*" >&2
}

main() {
    local conf=${KFORGE_SLURM_CONF:-/etc/default/kforge-sidecar}
    if [ -r "$conf" ]; then
        # shellcheck disable=SC1090
        . "$conf"
    fi
    local job=${SLURM_JOB_ID:-} user=${SLURM_JOB_USER:-}
    if [ -z "$job" ] || [ -z "$user" ]; then
        log "SLURM_JOB_ID or SLURM_JOB_USER not set; nothing to do"
        return 0
    fi
    local run_dir=${KFORGE_RUN_ROOT:-/run/kforge-sidecar}/job-$job
    [ -d "$run_dir" ] || return 0
    local lock=$run_dir/sidecar.sock.lock wait_s=$((${KFORGE_DRAIN_TIMEOUT:-60} + 15)) uid gid pid
    if uid=$(id -u "$user") && gid=$(id -g "$user"); then
        # The directory is the user's: read, lock and signal only as the user (a pid read
        # there can reach none but the user's own processes), each with a deadline.
        as_user() { timeout "$1" setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "${@:2}"; }
        # The sidecar holds an exclusive lock on this file while it runs, and wrote its pid in it.
        pid=$(as_user 5 head -c 32 "$lock" 2>/dev/null | tr -dc 0-9)
        if [ -n "$pid" ] && ! as_user 5 flock -n "$lock" true 2>/dev/null; then
            as_user 5 kill -s TERM "$pid" 2>/dev/null
            if as_user "$((wait_s + 5))" flock -w "$wait_s" "$lock" true; then
                log "sidecar (pid $pid) drained and stopped"
            else
                log "sidecar (pid $pid) still running after ${wait_s}s; killing it (frames stay in the spool)"
                as_user 5 kill -s KILL -- "-$pid" 2>/dev/null  # its session: uploaders too
            fi
        fi
    fi
    rm -rf -- "$run_dir"
}

(main)  # a subshell: even an error that ends it cannot change the exit status
exit 0
