#!/bin/bash
# Train with train_net.py on several Slurm nodes; a run stopped by Slurm is requeued and resumes.
#
#   sbatch --nodes=2 scripts/slurm_train.sh --config-file configs/mask_rcnn_R50_NL.yaml \
#       OUTPUT_DIR output/mask_rcnn_R50_NL
#
# Submit from the repository root. The arguments go to train_net.py (config file, KEY VALUE
# overrides). One task per node: each runs train_net.py with --num-gpus $GPUS_PER_NODE (default:
# the node's GPUs, else 8; the CPU process count without CUDA), --num-machines the node count,
# --machine-rank its node id ($SLURM_NODEID), --dist-url tcp://<first node's hostname>:$PORT
# (default 29500) and --resume (the first run starts from MODEL.WEIGHTS, a requeued one from
# OUTPUT_DIR/last_checkpoint).
# OUTPUT_DIR must be on a disk that every node sees.
#
# Preemption: 120 s before the time limit Slurm sends SIGUSR1 to the processes of the job step
# (--signal below), a preempting scheduler sends SIGTERM: train_net.py finishes its iteration,
# saves a checkpoint and exits with 75 (PREEMPTED_EXIT_CODE of nonlocal_det.engine.preemption);
# this script then requeues the job (scontrol requeue), which starts again with --resume.
#
#SBATCH --job-name=nonlocal_det
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -u
PREEMPTED_EXIT_CODE=75
export PYTHON=${PYTHON:-.venv/bin/python}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export DIST_URL="tcp://${first_node}:${PORT:-29500}"

# A SIGTERM to this shell (preemption) waits for train_net.py to save, then the requeue below.
trap 'echo "$(date): SIGTERM: waiting for train_net.py to save and stop"' TERM

echo "$(date): job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES}" \
    "node(s), --dist-url ${DIST_URL}"
# Single quotes: each task expands its own $SLURM_NODEID; "$@" are this script's arguments.
srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c 'exec "$PYTHON" train_net.py \
    --num-gpus "$GPUS_PER_NODE" --num-machines "$SLURM_JOB_NUM_NODES" \
    --machine-rank "$SLURM_NODEID" --dist-url "$DIST_URL" --resume "$@"' train_net.py "$@"
status=$?

if [ "$status" -eq "$PREEMPTED_EXIT_CODE" ]; then
    echo "$(date): train_net.py saved a checkpoint and stopped (exit ${status}):" \
        "requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID" || echo "$(date): scontrol requeue failed: resubmit" \
        "this script; it resumes from the last checkpoint" >&2
fi
exit "$status"
