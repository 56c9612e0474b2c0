#!/usr/bin/env bash
# The GPU benchmark of issue #18 in one command, for a fresh H100/H200 machine with no network whose image
# has PyTorch and an older transformers: install the wheels brought along in benchmarks/wheels/, check that
# the selection does not synchronise on CUDA (tests/test_batched.py), then benchmarks/gpu_bench.py on the
# LLaVA-1.5-7B and Qwen2.5-VL-7B shapes (random bf16 weights), at batch 1 and 16. Writes gpu.json, gpu.md
# and the test log to $OUT (the device tool's folder that comes back) or benchmarks/results/.
#
# The wheels (about 14 MB; the image's huggingface_hub 1.33, tokenizers 0.23.2 and safetensors 0.8 satisfy
# transformers 5.24), fetched here once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d benchmarks/wheels transformers==5.24.0 regex==2026.11.19
# On the device tool: run(command="bash benchmarks/gpu.sh", carry=["benchmarks/wheels"], timeout_s=540).
#
# Dry run on a CPU, in the project's venv, with tiny widths and nothing installed:
#   GPU_BENCH_DRY=1 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
start=$SECONDS
if [ -n "${GPU_BENCH_DRY:-}" ]; then
    python=.venv/bin/python
    args=(--shape tiny --repeats 1 --decode-tokens 2 --qwen-side 16 --out "$out/gpu-dry.json")
else
    python=python3
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        benchmarks/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    args=(--shape 7b --repeats 3 --decode-tokens 16 --out "$out/gpu.json")
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu-device.txt"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
$python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
# the sync-debug tests run where CUDA is (skipped elsewhere); a failure is logged, the benchmark still runs
timeout 60 $python -m pytest -q -p no:cacheprovider tests/test_batched.py -k "cuda or reads_nothing" 2>&1 | tail -15 | tee "$out/gpu-sync-tests.txt"
# the whole command stays under 8 minutes: the benchmark gets what is left of 470 s, and writes its files
# after each batch size, so a run cut short keeps what it measured
timeout $((470 - (SECONDS - start))) $python benchmarks/gpu_bench.py "${args[@]}"
status=$?
echo "gpu.sh: ${SECONDS} s in all, benchmark exit status $status"
exit $status
