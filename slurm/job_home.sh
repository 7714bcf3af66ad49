# shellcheck shell=bash
# Sourced by every job script: check that TSDKD_HOME is the repository root, cd there and export it.
# Under sbatch a job script runs from Slurm's spool folder, so each script sets TSDKD_HOME to the submission folder
# (or, outside Slurm, to its own parent folder) before sourcing this file. $1 names the script for error messages.
if [[ ! -f $TSDKD_HOME/slurm/launch.sh ]]; then
    echo "$1: error: $TSDKD_HOME is not the repository root; submit from it or set TSDKD_HOME" >&2
    exit 2
fi
cd "$TSDKD_HOME" || exit 2
export TSDKD_HOME
