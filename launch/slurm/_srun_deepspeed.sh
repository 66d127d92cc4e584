# Sourced by the SLURM scripts (after `cd` to the repository and sourcing launch/_venv.sh).
#
#   srun_deepspeed SLOTS [pdeds train arguments...]
#
# Rendezvous on the job's first node (MASTER_ADDR, MASTER_PORT default 29500), a hostfile with
# SLOTS ranks per node under runs/, and one deepspeed launcher per node started by srun;
# --no_ssh makes each launcher start only its own node's ranks.
srun_deepspeed() {
    local slots=$1
    shift
    # One check on the batch host before any rank starts (world size = nodes x slots).
    python -m pdeds train --check-only --ranks "$(( SLURM_NNODES * slots ))" "$@" || exit $?
    export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    export MASTER_PORT="${MASTER_PORT:-29500}"
    local hostfile="$PWD/runs/hostfile-$SLURM_JOB_ID"
    mkdir -p "$PWD/runs"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$slots/" > "$hostfile"
    local args
    args=$(printf '%q ' "$@")
    srun --kill-on-bad-exit=1 bash -c "deepspeed --hostfile '$hostfile' --no_ssh \
        --node_rank \$SLURM_NODEID --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
        --no_local_rank --module pdeds train $args"
}
