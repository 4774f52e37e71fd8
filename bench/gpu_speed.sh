#!/usr/bin/env bash
# Issue #25 on a lent GPU, the second command of a session (bench/gpu_session.sh is the first): full-size SDXL at
# batch 4 and FLUX.1-dev at batch 1 (checkpointing), 1024 px, rank 16, bf16: the floors, ours, the diffusers+peft
# peer, and ours with each speed option on its own (train/speed.py; "x plain ours" in the table), in one process per
# model. Each part has its own time limit, so one that hangs or fails leaves the other's table; logs go to $OUT.
#   bash bench/gpu_speed.sh            (on the GPU machine, from the repository root, after gpu_session.sh's install)
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.work/ComfyUI PYTHONUNBUFFERED=1
filt() { grep -v "Warning\|_pytree\|torchao\|register_constant"; }
OPTS="ours:attention=sdpa_flash,ours:attention=sdpa_cudnn,ours:attention=sdpa_efficient,ours:optimizer_impl=fused"
OPTS="$OPTS,ours:optimizer_impl=foreach,ours:lora_math=merged"
t0=$SECONDS
timeout "${SDXL_S:-280}" python3 bench/bench_gpu.py --family sdxl --batch 4 --steps 6 --warmup 3 \
  --trainers "floor,floor_act,ours,peer,ours:channels_last=true,$OPTS" 2>&1 | filt > "$OUT/speed_sdxl.log"
echo "sdxl: rc $? in $((SECONDS - t0)) s"; grep "^|\|Error\|error\|failed" "$OUT/speed_sdxl.log" | head -30
t0=$SECONDS
timeout "${FLUX_S:-280}" python3 bench/bench_gpu.py --family flux1 --batch 1 --steps 6 --warmup 3 \
  --trainers "floor,floor_act,ours,peer,$OPTS" 2>&1 | filt > "$OUT/speed_flux.log"
echo "flux1: rc $? in $((SECONDS - t0)) s"; grep "^|\|Error\|error\|failed" "$OUT/speed_flux.log" | head -30
