#!/bin/bash
# LIMA 65B on two 8xA100-80GB nodes under SLURM: one torchrun per node, 8 ranks each.
# On 16 GPUs, float32 weights and AdamW state need 84 GB per GPU; bf16 weights with optim.py's
# compensated AdamW need 59.1 GB (python train.py --plan true --preset llama-65b --world_size 16
# --weights bf16). With --nodes=4 drop --weights bf16: float32 needs 50.9 GB per GPU on 32.
#
#     sbatch slurm.sh                       # first run
#     sbatch slurm.sh                       # after a preemption: --resume auto picks up the newest checkpoint
#
# SLURM sends SIGTERM before it kills a job (--signal below asks for 120 s of warning); train.py
# saves a checkpoint at the next step boundary and exits 0, and the requeued job resumes.
#SBATCH --job-name=lima-65b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=out/slurm-%j.log

set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" \
    train.py --init ckpt/llama-65b --data lima/train.jsonl --dev lima/dev.jsonl \
             --out out/lima-65b --weights bf16 --resume auto
