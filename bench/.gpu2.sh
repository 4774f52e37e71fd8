set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.work/ComfyUI PYTHONUNBUFFERED=1
t0=$SECONDS
timeout 330 python3 bench/bench_memory.py --steps 3 --warmup 1 --plan "flux1:fp8@24,int4+offload@16;sdxl:bf16@12;qwen_image:fp8@24;flux1:bf16,int8@24;qwen_image:int4@24" 2>&1 | grep -v "Warning\|_pytree\|torchao" | tee $OUT/memory2.log | grep "^|\|OOM\|out of memory\|Error"
echo "memory: $((SECONDS - t0)) s"; t0=$SECONDS
timeout 100 python3 bench/bench_gpu.py --family flux1 --trainers ours,peer --steps 6 --warmup 2 2>&1 | grep -v "Warning\|_pytree" > $OUT/peer_flux.log
grep "^|\|ms, peak\|failed\|Error" $OUT/peer_flux.log; echo "peer: $((SECONDS - t0)) s"
