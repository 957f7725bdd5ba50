# H200 decode benchmark of the fast engine (issue 9), with its GPU tests first: run through the
# device tool, carrying .whl3 (the wheels the image lacks: pydantic and friends; see
# scripts/gpu_serve_bench.sh). Builds the Llama-3-8B architecture with random bf16 weights in
# memory (no download, no disk), 4 random r=16 adapters, then measures plain generate and the
# engine in one process. See docs/BENCHMARKS.md, "Decode speed on the H200".
source scripts/gpu_env.sh
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/serve/test_fast_engine.py tests/serve/test_fast_kernels.py -m "not slow" > "${OUT:-/tmp}/pytest.log" 2>&1
grep -E "^E |passed|failed" "${OUT:-/tmp}/pytest.log" | head -20
timeout 340 python3 -m loraforge.bench.decode --out "${OUT:-bench-out/decode}" "$@" 2>&1 | grep -v -i "warn"
