#!/usr/bin/env bash
# Every GPU measurement of issues #19 (memory modes, text encoders quantized while caching) and #24 (1 GPU shared by
# 2 data-parallel processes against 1 process) in one command, for a
# lent GPU machine with no network: the wheels in .whl/ (diffusers, optimum-quanto, torchsde, trampoline,
# importlib_metadata, prodigyopt, lion-pytorch; see BENCHMARKS.md) and .work/ComfyUI travel with the working tree.
# Each part has its own time limit, so one that hangs or fails leaves the others' tables; logs go to $OUT.
#   bash bench/gpu_session.sh            (on the GPU machine, from the repository root)
# Speed against the diffusers+peft peer (issue #25): python3 bench/bench_gpu.py --family flux1,sdxl; the speed options
# each as their own row of ours with an "x plain ours" ratio (the speed parts at the end)
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.work/ComfyUI PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft, optimum.quanto; print(torch.__version__, diffusers.__version__, peft.__version__)" \
  | tee -a "$OUT/gpu.txt"
filt() { grep -v "Warning\|_pytree\|torchao\|register_constant"; }
t0=$SECONDS  # every mode on the tiny models on this GPU first: a mode that breaks on CUDA shows in seconds
timeout "${SMOKE_S:-70}" python3 bench/bench_memory.py --tiny --device cuda --isolate off --steps 2 --warmup 1 \
  --plan "flux1:bf16,int8,int4,int4+offload;sdxl:int4+offload" 2>&1 | filt > "$OUT/smoke.log"
echo "smoke: rc $? in $((SECONDS - t0)) s"; grep "^|\|Error\|error" "$OUT/smoke.log" | head -20
t0=$SECONDS
timeout "${MEM_S:-280}" python3 bench/bench_memory.py --steps 3 --warmup 1 \
  --plan "${PLAN:-flux1:int4+offload@16,int8@24;qwen_image:int4@24;flux1:bf16}" 2>&1 | filt > "$OUT/memory.log"
echo "memory: rc $? in $((SECONDS - t0)) s"; grep "^|\|Error\|out of memory" "$OUT/memory.log" | head -30
t0=$SECONDS
timeout "${TE_S:-140}" python3 bench/bench_te_quant.py --captions 6 2>&1 | filt > "$OUT/te_quant.log"
echo "te quant: rc $? in $((SECONDS - t0)) s"; grep "^|\|Error\|error" "$OUT/te_quant.log" | head -20
t0=$SECONDS  # issue #24: the same run as 1 process x grad_accum 2 and as 2 processes sharing this GPU (a real ComfyUI
# server, tiny SD1.5; it needs ComfyUI's server requirements such as aiohttp: if the machine lacks them, the log says so)
timeout "${DDP_S:-150}" python3 bench/bench_ddp.py --device cuda --steps 6 2>&1 | filt > "$OUT/ddp.log"
echo "ddp: rc $? in $((SECONDS - t0)) s"; grep "^|\|Error\|error" "$OUT/ddp.log" | head -20
t0=$SECONDS  # issue #25 lora_math merged against plain ours (activation side): SDXL batch 4, where merging should pay
timeout "${LM_SDXL_S:-150}" python3 bench/bench_gpu.py --family sdxl --batch 4 --steps 8 --warmup 2 \
  --trainers ours,ours:lora_math=merged 2>&1 | filt > "$OUT/speed_lora_math_sdxl.log"
echo "speed lora_math sdxl: rc $? in $((SECONDS - t0)) s"; grep "^|\|Error\|error" "$OUT/speed_lora_math_sdxl.log" | head -20
t0=$SECONDS  # ... and FLUX.1-dev batch 1 (checkpointing on, bench_gpu's default for flux1)
timeout "${LM_FLUX_S:-150}" python3 bench/bench_gpu.py --family flux1 --batch 1 --steps 6 --warmup 2 \
  --trainers ours,ours:lora_math=merged 2>&1 | filt > "$OUT/speed_lora_math_flux1.log"
echo "speed lora_math flux1: rc $? in $((SECONDS - t0)) s"; grep "^|\|Error\|error" "$OUT/speed_lora_math_flux1.log" | head -20
