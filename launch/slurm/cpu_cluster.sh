#!/usr/bin/env bash
# SLURM batch script for a CPU cluster (Bridges2-RM-like: 128 cores per node).
# One deepspeed launcher per node, started by srun; ranks rendezvous on the first node.
#
#   sbatch --nodes=4 launch/slurm/cpu_cluster.sh launch/configs/quickstart.yaml --run-dir runs/cpu4
#
# Tune RANKS_PER_NODE (ranks per node) and THREADS (OpenMP threads per rank): their product
# should equal the cores per node. GLOO_SOCKET_IFNAME must name the high-speed interface.
#SBATCH --job-name=pdeds
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=pdeds-%j.out
set -euo pipefail
repo="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}"
cd "$repo"
source launch/_venv.sh
RANKS_PER_NODE="${RANKS_PER_NODE:-8}"
THREADS="${THREADS:-$(( $(nproc) / RANKS_PER_NODE ))}"
export OMP_NUM_THREADS="$THREADS"
export DS_ACCELERATOR=cpu
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$(ip -o -4 route show to default | awk '{print $5}')}"
source launch/slurm/_srun_deepspeed.sh
srun_deepspeed "$RANKS_PER_NODE" "$@"
