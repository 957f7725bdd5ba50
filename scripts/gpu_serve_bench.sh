# H200 serving benchmark (run through the device tool, carrying .whl3 with the wheels the
# image lacks: pydantic, fastapi, starlette, uvicorn, openai and their needs, and .carry/tok
# with the embedded tokenizer). See docs/BENCHMARKS.md.
# (or .gpusite.tgz: scripts/gpu_env.sh). REQUESTS / CONCURRENCY set the load.
source scripts/gpu_env.sh
python3 - <<'PY' || exit 1
from pathlib import Path
from loraforge.bench.train_smoke import build_random_model
build_random_model("llama3-8b", Path(".carry/tok"), Path("/tmp/m8b"))
from loraforge.bench.serve import make_random_adapters
make_random_adapters(Path("/tmp/m8b"), Path("/tmp/ad8b"), 4)
print("built")
PY
timeout 420 python3 -c "
import json,sys
from pathlib import Path
from loraforge.bench.serve import bench_serve
ad={f'adapter{k}': Path(f'/tmp/ad8b/adapter{k}') for k in range(4)}
r=bench_serve('/tmp/m8b', ad, Path('$OUT'), requests=${REQUESTS:-48}, concurrency=${CONCURRENCY:-16}, max_tokens=(32,96))
print(json.dumps(r, indent=1))
" 2>&1 | grep -v -i "warn\|Loading weights"
tail -5 $OUT/serve.log
