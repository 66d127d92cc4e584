#!/usr/bin/env bash
# SLURM batch script for GPU nodes (e.g. Azure ND H100 v5: 8 GPUs per node, InfiniBand).
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm/gpu_cluster.sh CONFIG --run-dir runs/gpu16
#
#SBATCH --job-name=pdeds-gpu
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=pdeds-%j.out
set -euo pipefail
repo="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}"
cd "$repo"
source launch/_venv.sh
GPUS="${SLURM_GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
GPUS="${GPUS##*:}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$(ip -o -4 route show to default | awk '{print $5}')}"
source launch/slurm/_srun_deepspeed.sh
srun_deepspeed "$GPUS" "$@"
