"""GPU micro-benchmark behind fused_lora's GEMM order (docs/BENCHMARKS.md, issue 7, fifth pass).

Per projection shape of Llama-3-8B at 8,192 tokens, r=32, bf16, ms per call (CUDA events):
  f0 / b0   the base GEMM alone (forward / input gradient)
  f1 / b1   the LoRA product added after it: a read-modify-write pass over the output
  f2 / b2   the LoRA product written first, the base GEMM adding into it (beta=1)
  f3        one GEMM over concatenated [x | h] and [W | B]
and q/k/v (one input, three projections): the input gradient and the LoRA A products one
projection at a time against grouped. Run on the device: python3 scripts/lora_gemm_probe.py
"""

import json

import torch

TOKENS, RANK = 8192, 32
SHAPES = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}


def timed(fn, calls: int = 40) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / calls, 4)


def rand(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale


def projection(d_in: int, d_out: int) -> dict:
    x, w = rand(TOKENS, d_in), rand(d_out, d_in, scale=0.02)
    a, b = rand(RANK, d_in, scale=0.02), rand(d_out, RANK, scale=0.02)
    h, g = x @ a.T, rand(TOKENS, d_out)
    gh, wb = g @ b, torch.cat([w, b], 1).contiguous()
    cases = {
        "f0": lambda: x @ w.T,
        "f1": lambda: (x @ w.T).addmm_(h, b.T),
        "f2": lambda: (h @ b.T).addmm_(x, w.T),
        "f3": lambda: torch.cat([x, h], 1) @ wb.T,
        "b0": lambda: g @ w,
        "b1": lambda: (g @ w).addmm_(gh, a),
        "b2": lambda: (gh @ a).addmm_(g, w),
    }
    reference = x.float() @ w.float().T + h.float() @ b.float().T
    error = {k: (cases[k]().float() - reference).abs().max().item() for k in ("f1", "f2")}
    return {k: timed(fn) for k, fn in cases.items()} | {"max_error": error}


def shared_input() -> dict:
    x = rand(TOKENS, 4096)
    ws = [rand(d, 4096, scale=0.02) for d in (4096, 1024, 1024)]
    a_s = [rand(RANK, 4096, scale=0.02) for _ in ws]
    gs = [rand(TOKENS, w.shape[0]) for w in ws]
    ghs = [rand(TOKENS, RANK) for _ in ws]
    a_cat, gh_cat = torch.cat(a_s), torch.cat(ghs, 1)

    def input_grad_one_by_one():
        parts = [(g @ w).addmm_(gh, a) for g, w, gh, a in zip(gs, ws, ghs, a_s)]
        return parts[0] + parts[1] + parts[2]

    def input_grad_grouped():
        out = gh_cat @ a_cat
        for g, w in zip(gs, ws):
            out.addmm_(g, w)
        return out

    return {
        "input_grad_one_by_one": timed(input_grad_one_by_one),
        "input_grad_grouped": timed(input_grad_grouped),
        "xA_one_by_one": timed(lambda: [x @ a.T for a in a_s]),
        "xA_grouped": timed(lambda: x @ a_cat.T),
        "grad_A_one_by_one": timed(lambda: [torch.mm(gh.T, x, out_dtype=torch.float32) for gh in ghs]),
        "grad_A_grouped": timed(lambda: torch.mm(gh_cat.T, x, out_dtype=torch.float32)),
    }


def main() -> None:
    torch.manual_seed(0)
    results = {name: projection(*shape) for name, shape in SHAPES.items()} | {"q/k/v": shared_input()}
    for name, row in results.items():
        print(name, row)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
