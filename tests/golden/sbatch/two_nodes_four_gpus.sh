#!/bin/bash

# Parameters
#SBATCH --constraint=a100-80g
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --gpus-per-node=a100:4
#SBATCH --job-name=mistral-7b-qlora
#SBATCH --mail-type=END
#SBATCH --mem=64G
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/shared/runs/mistral-7b-qlora/slurm/%j/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@180
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
FTLIB_REQUEUE_MARKER=/shared/runs/mistral-7b-qlora/slurm/requeue-$SLURM_JOB_ID
trap 'if [ -e "$FTLIB_REQUEUE_MARKER" ]; then rm -f "$FTLIB_REQUEUE_MARKER"; echo "ftlib: requeueing job $SLURM_JOB_ID, as the job asked"; scontrol requeue "$SLURM_JOB_ID"; fi' EXIT
unset WANDB_SERVICE
export HF_HOME=/shared/hf
module load cuda/12.4

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/runs/mistral-7b-qlora/slurm/%j/%j_%t_log.out --kill-on-bad-exit=1 <PYTHON> -u -m submitit.core._submit /shared/runs/mistral-7b-qlora/slurm/%j
