# H200 training speed benchmark (issue 7), with the speed levers' GPU tests first. Run through
# the device tool, carrying .gpusite.tgz (scripts/make_gpu_bundle.sh: the wheels the image lacks, installed with --target:
# pydantic, bitsandbytes 0.50.2 (CUDA 13 binary only), liger-kernel, and Unsloth 2026.10.9 with
# unsloth_zoo, trl 1.15.0, datasets 4.8.4 and their small needs), .carry/tok (the embedded
# tokenizer) and .carry/data (the shared Alpaca file). Arguments go to
# `python -m loraforge.bench.train_speed` (e.g. --cases dense --quants bf16). Set TESTS=0 to
# skip the tests. The model folder and /tmp/gpusite stay while the machine is warm.
set -o pipefail
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${TESTS:-1}" = 1 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/train/test_speed_gpu.py > "$OUT/pytest-train.log" 2>&1
  grep -E "^E |passed|failed|error" "$OUT/pytest-train.log" | head -20
fi
timeout ${BENCH_TIMEOUT:-480} python3 -m loraforge.bench.train_speed --tokenizer .carry/tok --alpaca .carry/data/alpaca_cleaned_1000.json \
  --work /tmp/lf-bench --out "$OUT" "$@" 2>&1 | grep -v -i "warn" | tail -40
