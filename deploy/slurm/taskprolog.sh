#!/bin/bash
# kforge-sidecar TaskProlog: give each task of the job the address of the sidecar
# that the Prolog (prolog.sh beside this file) started for the job on its node.
#
#   slurm.conf:  TaskProlog=/etc/slurm/kforge-sidecar/taskprolog.sh
#
# Runs as the job's user before each task; slurmstepd applies the `export NAME=value`
# lines it prints. Prints nothing when the task already has KFORGE_SIDECAR_ADDR
# (the user runs their own sidecar) or when the Prolog made no socket directory for
# this job. Always exits 0. KFORGE_RUN_ROOT: as in prolog.sh (from
# /etc/default/kforge-sidecar when readable).
set -u

main() {
    local conf=${KFORGE_SLURM_CONF:-/etc/default/kforge-sidecar}
    if [ -r "$conf" ]; then
        # shellcheck disable=SC1090
        . "$conf" 2>/dev/null
    fi
    [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${KFORGE_SIDECAR_ADDR:-}" ] || return 0
    local run_dir=${KFORGE_RUN_ROOT:-/run/kforge-sidecar}/job-$SLURM_JOB_ID
    [ -d "$run_dir" ] || return 0
    echo "export KFORGE_SIDECAR_ADDR=ipc://$run_dir/sidecar.sock"
}

(main)  # a subshell: even an error that ends it cannot change the exit status
exit 0
