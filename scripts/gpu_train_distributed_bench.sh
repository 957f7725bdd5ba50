# Distributed-training benchmark (issue 8) on a 2-GPU H200 machine: run through the device
# tool with kind nvidia-h200-x2, carrying .whl with the wheels the image lacks (pydantic,
# pydantic-core, annotated-types, typing-inspection for Python 3.12, bitsandbytes 0.50.2):
#   pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
#     pydantic pydantic-core annotated-types typing-inspection bitsandbytes==0.50.2
# CASES=8b (Llama-3-8B shape, bf16 LoRA: 1 GPU vs 2, DDP) and CASES=70b (Llama-3-70B shape,
# QLoRA, FSDP over 2) fit one 10-minute call each. See docs/BENCHMARKS.md.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site8 .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site8:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast stays off on shared hosts (the device notes): NCCL, PyTorch and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
timeout 570 python3 -m loraforge.bench.train_distributed --gpus "${GPUS:-2}" --cases "${CASES:-8b,70b}" --steps "${STEPS:-8}" \
  --out "$OUT" --work /tmp/loraforge-train-distributed 2>&1 | grep -v -i "warn\|Loading weights"
