#!/usr/bin/env bash
# Every GPU measurement of issues #19 (memory modes) and #25 (speed, with the diffusers+peft peer) in one command,
# for a lent GPU machine with no network: the wheels in .whl/ (diffusers, optimum-quanto, torchsde, trampoline,
# importlib_metadata, prodigyopt, lion-pytorch; see BENCHMARKS.md) and .work/ComfyUI travel with the working tree.
# Each part has its own time limit, so one that hangs or fails leaves the others' tables; logs go to $OUT.
#   bash bench/gpu_session.sh            (on the GPU machine, from the repository root)
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.work/ComfyUI PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft, optimum.quanto; print(torch.__version__, diffusers.__version__, peft.__version__)" \
  | tee -a "$OUT/gpu.txt"
t0=$SECONDS
timeout "${MEM_S:-240}" python3 bench/bench_memory.py --steps 4 --warmup 1 \
  --plan "flux1:bf16,fp8@24,int8@24,int4+offload@16;sdxl:bf16@12;qwen_image:bf16,fp8@24,int4@24" \
  > "$OUT/memory.log" 2>&1
echo "memory: rc $? in $((SECONDS - t0)) s"; grep "^|" "$OUT/memory.log"
t0=$SECONDS
timeout "${B1_S:-200}" python3 bench/bench_gpu.py --family flux1,sdxl --steps 8 --warmup 2 > "$OUT/speed_b1.log" 2>&1
echo "speed batch 1: rc $? in $((SECONDS - t0)) s"; grep "^|\|ms, peak\|failed\|out of memory" "$OUT/speed_b1.log"
t0=$SECONDS
timeout "${B4_S:-100}" python3 bench/bench_gpu.py --family sdxl --batch 4 --steps 8 --warmup 2 > "$OUT/speed_b4.log" 2>&1
echo "speed batch 4: rc $? in $((SECONDS - t0)) s"; grep "^|\|ms, peak\|failed\|out of memory" "$OUT/speed_b4.log"
