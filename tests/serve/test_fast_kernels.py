"""The Triton LoRA expand (``serve.fast.kernels``) against the torch form it replaces (GPU only)."""

from __future__ import annotations

import pytest
import torch

from loraforge.serve.fast import kernels

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.AVAILABLE), reason="needs CUDA and triton")


def test_cpu_never_uses_the_kernel():
    assert not kernels.usable(torch.device("cpu"), torch.bfloat16)
    assert not kernels.usable(torch.device("cuda"), torch.float32)  # fp32 stays on torch's exact path


def bank_like(outs: list[int], K: int, R: int, dtype) -> torch.Tensor:
    """B as the bank lays it out: [n * K * R, sum(outs)], block diagonal per module, slot 0 zero."""
    n, total = len(outs), sum(outs)
    b = torch.zeros(n, K, R, total, device="cuda")
    col = 0
    for m, width in enumerate(outs):
        b[m, 1:, :, col : col + width] = torch.randn(K - 1, R, width, device="cuda") / R**0.5
        col += width
    return b.view(n * K * R, total).to(dtype)


def torch_expand(out, h, B, slot, K, R, n):
    onehot = (slot[:, None] == torch.arange(K, device=slot.device)[None, :]).to(out.dtype)
    mask = onehot[:, :, None].expand(-1, -1, R).reshape(len(slot), K * R).repeat(1, n)
    return out.addmm_(h * mask, B)


CASES = [  # (T, R, module outputs, K)
    (1, 16, [4096], 5),
    (7, 4, [256, 64, 64], 3),  # q/k/v-like: tiles straddle module bounds only if widths do not divide 64
    (64, 16, [4096, 1024, 1024], 5),  # an 8B model's qkv, a 64-stream decode step
    (64, 16, [14336, 14336], 5),  # its gate_up: 28,672 output columns
    (100, 8, [200, 72, 72], 4),  # widths not multiples of the tile: tiles do straddle modules
    (300, 64, [4096], 3),  # a prefill chunk, the largest rank
    (512, 32, [1024, 1024], 9),
    (33, 3, [130], 2),  # odd rank and width
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["slice_of_matmul_output", "column_major"])
@pytest.mark.parametrize("T,R,outs,K", CASES)
def test_triton_expand_equals_the_torch_form(T, R, outs, K, layout, dtype):
    torch.manual_seed(T * 1000 + R)
    n, N = len(outs), sum(outs)
    B = bank_like(outs, K, R, dtype)
    wide = torch.randn(T, N + n * K * R + 16, device="cuda").to(dtype)  # base | h | padding, as the fused matmul writes it
    h = wide[:, N : N + n * K * R]
    if layout == "slice_of_matmul_output":
        out = wide[:, :N]
    else:
        out = torch.randn(N, T, device="cuda").to(dtype).t()  # stride (1, T)
    slot = torch.randint(0, K, (T,), device="cuda")
    slot[0] = 0  # a base row always, and (for T > 1) some adapter row
    if T > 1:
        slot[-1] = K - 1
    before, wide_before = out.clone(), wide.clone()
    # the reference on a contiguous copy: cuBLAS refuses some degenerate strides (T = 1, column-major)
    expected = torch_expand(out.clone(memory_format=torch.contiguous_format), h, B, slot, K, R, n)
    kernels.expand_(out, h, B, slot, K, R, tuple(sum(outs[:i]) for i in range(1, n)))
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)  # one rounding each, summed in a different order
    assert torch.equal(out[slot == 0], before[slot == 0])  # base rows untouched
    if layout == "slice_of_matmul_output":
        assert torch.equal(wide[:, N:], wide_before[:, N:])  # nothing written past out


@needs_triton
def test_triton_expand_is_captured_in_a_cuda_graph():
    T, R, outs, K = 16, 16, [512, 128, 128], 4
    n, N = len(outs), sum(outs)
    B = bank_like(outs, K, R, torch.bfloat16)
    x = torch.randn(T, N + n * K * R, device="cuda", dtype=torch.bfloat16)
    slot = torch.arange(T, device="cuda") % K
    y = torch.empty_like(x)

    def step():
        y.copy_(x)
        kernels.expand_(y[:, :N], y[:, N:], B, slot, K, R, (512, 640))

    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    slot.copy_(torch.arange(T, device="cuda").flip(0) % K)  # new adapters per row, same addresses
    graph.replay()
    expected = torch_expand(x[:, :N].clone(), x[:, N:], B, slot, K, R, n)
    torch.testing.assert_close(y[:, :N], expected, atol=2e-2, rtol=2e-2)
