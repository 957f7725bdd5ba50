"""GPU micro-benchmark behind train.nf4 (docs/BENCHMARKS.md, issue 7, seventh pass).

Per weight shape of Llama-3-8B (NF4, double quantization, bf16 out, as loraforge's QLoRA loads
it): ms per dequantization (CUDA events, mean of 100 after warm-up; 10 warm-up calls in the runs of
BENCHMARKS, 5 since the timing is shared with lora_gemm_probe) by bitsandbytes'
``dequantize_4bit`` and by loraforge's kernel, the bandwidth each reaches (packed bytes and
absmax codes read, bf16 written), whether the two agree bitwise, and per training step (7
weights a layer, 32 layers, 14 dequantizations a layer). Run on the device:
python3 scripts/nf4_probe.py
"""

import json

import bitsandbytes.functional as bnbf
import torch

from lora_gemm_probe import timed  # the probes' CUDA-event timing (scripts/ is on sys.path when run)
from loraforge.train import nf4

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}


def main() -> None:
    rows, step = {}, {"bitsandbytes": 0.0, "loraforge": 0.0}
    for name, shape in SHAPES.items():
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ms = {
            "bitsandbytes": timed(lambda: bnbf.dequantize_4bit(packed, state), calls=100),
            "loraforge": timed(lambda: nf4.dequantize(packed, state), calls=100),
        }
        moved = w.numel() / 2 + state.absmax.numel() + w.numel() * 2  # bytes read and written
        rows[name] = {
            **{k: round(v, 4) for k, v in ms.items()},
            "GB/s": {k: round(moved / v / 1e6) for k, v in ms.items()},
            "bitwise equal": torch.equal(bnbf.dequantize_4bit(packed, state), nf4.dequantize(packed, state)),
        }
        for k in step:
            step[k] += ms[k] * PER_LAYER[name] * 2 * 32  # forward and backward, 32 layers
    print(json.dumps({"per weight (ms)": rows, "per step, 14 a layer (ms)": {k: round(v, 1) for k, v in step.items()}}, indent=1))
    sweep = {}
    for block in (512, 1024, 2048, 4096):
        for warps in (2, 4, 8):
            total = 0.0
            for name, shape in SHAPES.items():
                w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                total += timed(lambda: nf4.dequantize(packed, state, block=block, num_warps=warps), calls=100) * PER_LAYER[name] * 2 * 32
            sweep[f"block {block}, {warps} warps"] = round(total, 2)
    print("per step by program size (ms):", json.dumps(sweep))


if __name__ == "__main__":
    main()
