# Builds .gpusite.tgz (~23 MB, under the device tool's 64 MiB carry limit): every package the
# H200 image lacks for the GPU benchmarks, installed for its Python 3.12 with --target and
# packed once. bitsandbytes keeps only its CUDA 13 binaries and Unsloth drops its web studio,
# which is what makes Unsloth's needs and bitsandbytes fit one carry.
set -e
work=$(mktemp -d)
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$work/wheels" \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection bitsandbytes==0.50.2 liger-kernel==0.8.5 gguf \
  fastapi starlette uvicorn openai httpx2 httpcore2 jiter distro sniffio opentelemetry-api \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.4 tyro cut_cross_entropy msgspec json5 \
  nest-asyncio structlog docstring_parser shtab typeguard hf_transfer dill multiprocess truststore orjson==3.13.0
pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --target "$work/gpusite" "$work"/wheels/*.whl
rm -rf "$work"/gpusite/{studio,unsloth/studio,bin} "$work"/gpusite/bitsandbytes/libbitsandbytes_{cuda1[12]*,rocm*,xpu*}.so
tar czf .gpusite.tgz -C "$work" gpusite
rm -rf "$work"
ls -la .gpusite.tgz
