#!/bin/bash
# The CUDA path, checked in one go on a GPU machine (the project's tests run on CPUs):
# the whole recipe at its default size with device=cuda (bf16 autocast in every loop stage,
# SDPA, generation on the GPU), then FSDP2 on one GPU under torchrun and torch.compile.
# Usage: OUT=dir bash benchmarks/cuda_check.sh   (copies the report and logs into $OUT)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/cuda_check}
mkdir -p "$OUT"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
nproc
R=/tmp/recipe_cuda
rm -rf $R
( time python3 -m llama2.cli recipe --out $R device=cuda threads=8 ) 2>&1 \
  | grep -v -E "it/s|step/s|prompt/s|dialog/s|iter/s|s/it|s/step" | tee "$OUT/recipe.log"
cp $R/report.json $R/report.md "$OUT/" 2>/dev/null
cp $R/ppo/metrics.jsonl "$OUT/ppo_metrics.jsonl" 2>/dev/null
# FSDP2 on one GPU and torch.compile, on the recipe's data
( time torchrun --standalone --nproc_per_node 1 -m llama2.cli pretrain --out /tmp/fsdp \
    --config configs/tiny-15m.yaml steps=60 eval_every=30 ckpt_every=30 compile=true \
    data=$R/data/shards tokenizer=$R/data/tokenizer.model ) 2>&1 | tail -5 | tee "$OUT/fsdp.log"
tail -2 /tmp/fsdp/metrics.jsonl | tee -a "$OUT/fsdp.log"
