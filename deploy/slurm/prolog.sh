#!/bin/bash
# kforge-sidecar Prolog: start one kforge-sidecar for the job on this node, as the
# job's user, so that its trainer finds one without the batch script starting it.
#
# Install on every compute node, with the Epilog and TaskProlog beside it
# (slurm.conf; or drop the files into the directories that your Prolog= globs):
#   Prolog=/etc/slurm/kforge-sidecar/prolog.sh
#   Epilog=/etc/slurm/kforge-sidecar/epilog.sh
#   TaskProlog=/etc/slurm/kforge-sidecar/taskprolog.sh
# The TaskProlog exports KFORGE_SIDECAR_ADDR to the job's tasks; the Epilog drains
# the sidecar (hands wandb what is spooled) and stops it.
#
# Runs as root. Fast and best-effort: it starts the sidecar in the background
# (its own session, so slurmd does not wait for it or kill it with the Prolog)
# and returns at once. It ALWAYS exits 0: a failing Prolog drains the node and
# requeues the job. Problems go to syslog (tag kforge-sidecar), and the
# sidecar's own log to $KFORGE_STATE_ROOT/USER/logs/JOBID.log.
#
# Per job and node: socket  $KFORGE_RUN_ROOT/job-JOBID/sidecar.sock (directory 0700, the user's)
#                   spool   $KFORGE_STATE_ROOT/USER/spool/job-JOBID (0700, the user's; kept:
#                           what wandb did not take waits there for `kforge-sidecar sync`)
# wandb credentials: the user's own (~/.netrc from `wandb login`, or WANDB_API_KEY in
# the settings file for a site-wide service account).
#
# Settings: /etc/default/kforge-sidecar (KFORGE_SLURM_CONF to use another file) is
# sourced if present and everything it sets is exported to the sidecar; the same
# names can come from slurmd's environment. Keep the file readable by users (the
# TaskProlog runs as the user and reads KFORGE_RUN_ROOT from it) unless it holds a key.
#   KFORGE_SIDECAR        kforge-sidecar executable (default: the one on PATH)
#   KFORGE_RUN_ROOT       sockets (default /run/kforge-sidecar; node-local, short path)
#   KFORGE_STATE_ROOT     spools and logs (default /var/lib/kforge-sidecar; node-local)
#   KFORGE_DRAIN_TIMEOUT  seconds the sidecar gets to drain in the Epilog (default 60)
#   KFORGE_SERVE_ARGS     more `serve` options, e.g. "--init-timeout 120"
#   WANDB_BASE_URL, WANDB_API_KEY, ...  passed to the sidecar's uploaders
set -u

log() {
    logger -t kforge-sidecar -- "prolog job ${SLURM_JOB_ID:-?}: $*" 2>/dev/null \
        || echo "kforge-sidecar prolog job ${SLURM_JOB_ID:-?}: $*" >&2
}

main() {
    local conf=${KFORGE_SLURM_CONF:-/etc/default/kforge-sidecar}
    if [ -r "$conf" ]; then
        set -a
        # shellcheck disable=SC1090
        . "$conf"
        set +a
    fi
    local job=${SLURM_JOB_ID:-} user=${SLURM_JOB_USER:-}
    if [ -z "$job" ] || [ -z "$user" ]; then
        log "SLURM_JOB_ID or SLURM_JOB_USER not set; nothing to do"
        return 0
    fi
    local bin=${KFORGE_SIDECAR:-$(command -v kforge-sidecar)}
    if [ -z "$bin" ] || [ ! -x "$bin" ]; then
        log "kforge-sidecar not found (set KFORGE_SIDECAR in $conf); no sidecar for this job"
        return 0
    fi
    local uid gid home
    if ! { uid=$(id -u "$user") && gid=$(id -g "$user") && home=$(getent passwd "$user" | cut -d: -f6); }; then
        log "unknown user $user"
        return 0
    fi
    local run_dir=${KFORGE_RUN_ROOT:-/run/kforge-sidecar}/job-$job
    local state=${KFORGE_STATE_ROOT:-/var/lib/kforge-sidecar}/$user
    # Root creates only these two, in root-owned parents; what goes inside them the
    # sidecar creates as the user (never chown or write as root in a user's directory).
    # The sidecar refuses a socket directory that is not its user's own and 0700.
    if ! install -d -m 0755 "${run_dir%/*}" "${state%/*}" \
        || ! install -d -m 0700 -o "$uid" -g "$gid" "$run_dir" "$state"; then
        log "cannot create $run_dir or $state"
        return 0
    fi
    local -a extra=()
    read -r -a extra <<<"${KFORGE_SERVE_ARGS:-}"
    # Its own session (setsid): slurmd kills the Prolog's process group when the Prolog
    # exits. Its cwd and WANDB_DIR: the user's state directory (wandb writes there).
    cd "$state" || return 0
    setsid setpriv --reuid="$uid" --regid="$gid" --init-groups -- \
        env HOME="$home" USER="$user" LOGNAME="$user" WANDB_DIR="${WANDB_DIR:-$state}" \
        "$bin" serve --address "ipc://$run_dir/sidecar.sock" --spool-dir "$state/spool/job-$job" \
        --log-file "$state/logs/$job.log" --drain-timeout "${KFORGE_DRAIN_TIMEOUT:-60}" ${extra[@]+"${extra[@]}"} \
        </dev/null >/dev/null 2>&1 &
    # Return only once it has left our session (or exited), so that kill cannot reach it.
    local pid=$! mine i
    mine=$(ps -o sid= -p $$)
    for ((i = 0; i < 100; i++)); do
        [ "$(ps -o sid= -p "$pid")" != "$mine" ] && break
        sleep 0.02
    done
    log "started kforge-sidecar for $user on ipc://$run_dir/sidecar.sock (log $state/logs/$job.log)"
}

(main)  # a subshell: even an error that ends it cannot change the exit status
exit 0
