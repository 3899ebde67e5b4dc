#!/usr/bin/env bash
# The product-world model's whole job on a GPU machine, in order: every training stage over all its
# GPUs (accelerate DDP), then the fidelity evaluation and the base model's gates on GPU 0 and GPU 1
# side by side. Started (once) by bench/world_device.sh; writes under /tmp/world.
# Usage: bench/world_job.sh [python -m dreamcache.world.model args...]
set -u
W=/tmp/world
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p $W/results
step() { echo "=== $(date +%T) $*"; }

WORKERS=$(( $(nproc) / GPUS - 1 ))
if [ ! -f $W/results/speed.json ] && [ "${SPEED:-1}" = 1 ]; then
  # Throughput side by side (BENCHMARKS.md): it renders the pool that the training then reuses.
  step "training throughput on GPU 0"
  CUDA_VISIBLE_DEVICES=0 timeout 600 python3 bench/world_training_speed.py --pool $W/model/pool --workers $WORKERS \
    --output $W/results/speed.json 2>&1 | grep -v -i "warn\|loading weights" || echo "throughput benchmark failed"
fi

step "training on $GPUS GPU(s)"
launch=(python3 -m accelerate.commands.launch --num_machines 1 --num_processes "$GPUS" --mixed_precision bf16
        --dynamo_backend no --main_process_port 29517)
[ "$GPUS" -gt 1 ] && launch+=(--multi_gpu)
train() { "${launch[@]}" -m dreamcache.world.model --output $W/model --workers $WORKERS "$@"; }
# Should compilation fail on this machine, the eager levers still train (finished stages are kept).
train "$@" || { step "training failed; again without torch.compile"; train "$@" --levers channels-last,fused-adamw,latents-once; } \
  || { touch $W/failed; exit 1; }
cp $W/model/training.json $W/results/

step "evaluation"
evaluate() {
  [ "${EVAL:-1}" = 1 ] || return 0  # EVAL=0: the base's gates alone (a short session measuring one stage)
  CUDA_VISIBLE_DEVICES=0 python3 -m dreamcache.world.evaluation --model $W/model --products 24 --seeds 2 \
    --image-scale auto --output $W/results/world_fidelity.json --figures $W/results > $W/results/evaluation.log 2>&1
}
gates() {
  [ "${GATES:-1}" = 1 ] || return 0  # GATES=0: the base is the one continued, its gates already on record
  export CUDA_VISIBLE_DEVICES=$(( GPUS - 1 ))
  python3 bench/world_sdedit_bound.py $W/model --output $W/results/world_sdedit_bound.json > $W/results/gates.log 2>&1
  python3 bench/world_prior.py $W/model --output $W/results/world_prior.json >> $W/results/gates.log 2>&1
}
evaluate & gates & wait
tail -3 $W/results/evaluation.log; cat $W/results/gates.log | grep -v -i warn
step "done"
touch $W/done
