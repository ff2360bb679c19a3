#!/bin/bash

# Parameters
#SBATCH --array=0-2%2
#SBATCH --cpus-per-task=1
#SBATCH --job-name=tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/runs/tiny.array/%A_%a/%A_%a_0_log.out
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=20
#SBATCH --wckey=submitit

# setup
FTLIB_REQUEUE_MARKER=/shared/runs/tiny.array/requeue-$SLURM_JOB_ID
trap 'if [ -e "$FTLIB_REQUEUE_MARKER" ]; then rm -f "$FTLIB_REQUEUE_MARKER"; echo "ftlib: requeueing job $SLURM_JOB_ID, as the job asked"; scontrol requeue "$SLURM_JOB_ID"; fi' EXIT
unset WANDB_SERVICE
export HF_HOME=/shared/hf

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/runs/tiny.array/%A_%a/%A_%a_%t_log.out <PYTHON> -u -m submitit.core._submit /shared/runs/tiny.array/%j
