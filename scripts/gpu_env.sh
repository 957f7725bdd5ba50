# Sourced by the scripts/gpu_*.sh benchmarks on the device machine: puts the Python packages
# its image lacks on PYTHONPATH and prints what runs. The packages come from .gpusite.tgz (one
# bundle, made here by scripts/make_gpu_bundle.sh) when it was carried, else from the wheels
# in .whl3 (serving's needs only). Unpacked under /tmp, which lasts while the machine is warm.
if [ -f .gpusite.tgz ]; then
  [ -d /tmp/gpusite ] || tar xzf .gpusite.tgz -C /tmp || exit 1
  SITE=/tmp/gpusite
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site3 .whl3/*.whl || exit 1
  SITE=/tmp/site3
fi
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast there
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
