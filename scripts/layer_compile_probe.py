"""GPU probe: does torch.compile of the decoder layers pay in loraforge's speed mode? (issue 7)

Builds Llama-3-8B's shape with 4 decoder layers (random bf16 weights), LoRA r=32 on the 7
linear layers, and loraforge's CUDA levers as ``loraforge train`` sets them (Liger rope /
RMSNorm / SwiGLU, fused and grouped LoRA, flash varlen attention, fused loss); one step of
2 x 4,096 packed tokens, forward and backward, nothing recomputed. Times the step eagerly,
then with every decoder layer compiled (``nn.Module.compile``, default mode), CUDA events,
median of 10 after warm-up; prints the compile time, graph breaks and the difference per
layer (x 32 for the 8B). Run on the device: python3 scripts/layer_compile_probe.py
"""

import json
import statistics
import time

import torch
import torch._dynamo


def build(layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.bench.train_smoke import LLAMA3_8B
    from loraforge.config import TrainConfig
    from loraforge.train import attention, fused_lora
    from loraforge.train.model import apply_accelerations

    config = LlamaConfig(**(LLAMA3_8B | {"num_hidden_layers": layers}))
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.set_attn_implementation(attention.register())
    notes = apply_accelerations(model, TrainConfig(), torch.device("cuda"))
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"))
    model.train()
    fused_lora.apply(model)
    fused_lora.group(model)
    return model, notes


def step_ms(loss_fn, inputs, steps: int = 10) -> list[float]:
    times = []
    for i in range(steps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss_fn(**inputs).backward()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return times


def main(layers: int = 4) -> None:
    from loraforge.train import attention
    from loraforge.train.loss import CausalLMLoss

    model, notes = build(layers)
    loss_fn = CausalLMLoss(model, True)
    tokens, row = 8192, 4096
    ids = torch.randint(0, 128000, (1, tokens), device="cuda")
    positions = torch.arange(row, device="cuda").repeat(tokens // row).unsqueeze(0)
    cu = torch.arange(0, tokens + 1, row, device="cuda", dtype=torch.int32)
    inputs = {"input_ids": ids, "labels": ids, "position_ids": positions, **attention.flat_kwargs(cu, row)}
    eager = step_ms(loss_fn, inputs)


    torch._dynamo.utils.counters.clear()
    for layer in model.get_base_model().model.layers:
        layer.compile()
    started = time.perf_counter()
    result = {"notes": notes, "eager ms/step": round(statistics.median(eager), 2)}
    try:
        loss_fn(**inputs).backward()
        torch.cuda.synchronize()
        result["first compiled step s"] = round(time.perf_counter() - started, 1)
        compiled = step_ms(loss_fn, inputs)
        result["compiled ms/step"] = round(statistics.median(compiled), 2)
        result["per layer ms (compiled - eager)"] = round((result["compiled ms/step"] - result["eager ms/step"]) / layers, 3)
        result["x 32 layers ms"] = round(result["per layer ms (compiled - eager)"] * 32, 1)
    except Exception as exc:  # what fails is the finding
        result["compile failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    counters = torch._dynamo.utils.counters
    result["graph breaks"] = {str(k)[:120]: v for k, v in counters["graph_break"].items()}
    result["recompiles"] = sum(counters["recompiles"].values()) if "recompiles" in counters else None
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
