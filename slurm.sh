#!/bin/bash
# LIMA 65B on one 8xA100-80GB node under SLURM: one torchrun per node, 8 ranks each.
# train.py picks the most precise configuration that its memory plan fits (printed at the start):
# on 8 GPUs bf16 weights with stochastic rounding, stepped in backward (75.5 GB per GPU); with
# --nodes=2 float32 stepped in backward (68.0 GB); with --nodes=4 the ordinary float32 step
# (51.1 GB). See python train.py --plan true --preset llama-65b --world_size 8 (16, 32).
#
#     sbatch slurm.sh                       # first run
#     sbatch slurm.sh                       # after a preemption: --resume auto picks up the newest checkpoint
#
# SLURM sends SIGTERM before it kills a job (--signal below asks for 120 s of warning); every rank
# of train.py saves a checkpoint at the next step boundary, prints "stopped by a signal at step N"
# and exits 0, but torchrun itself, signalled too, then exits 1 with a SignalException traceback
# of its own (torch's launcher). That exit after a clean save is not a failure: this script
# requeues the job, which resumes with --resume auto.
#SBATCH --job-name=lima-65b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=out/slurm-%j.log

set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
log="out/slurm-$SLURM_JOB_ID.log"
if ! srun torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" \
    train.py --init ckpt/llama-65b --data lima/train.jsonl --dev lima/dev.jsonl \
             --out out/lima-65b --resume auto; then
    if grep -q "stopped by a signal at step" "$log"; then  # saved: come back and resume
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit 1
fi
