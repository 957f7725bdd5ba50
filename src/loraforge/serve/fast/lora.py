"""Batched LoRA: every loaded adapter stacked, so one batch mixes adapters in one matmul pass.

PEFT serves a mixed batch by looping over the adapters present and running each sub-batch
through its own small matmuls, in every linear layer. Here the adapters' weights live in a
few stacked tensors and each row picks its adapter by a slot index; the decode step has no
Python loop over rows or adapters and keeps static shapes (so it can be a CUDA graph).

Memory layout, per decoder layer, per *group* of target modules that read the same input
(the base weights are fused the same way, ``GroupWeight``):

    group     modules                       input
    qkv       q_proj, k_proj, v_proj        the attention RMSNorm's output
    o         o_proj                        the attention output
    gate_up   gate_proj, up_proj            the MLP RMSNorm's output
    down      down_proj                     silu(gate) * up

    W: [out, in]                  the base weight, the group's modules one after the other
    A: [n_modules * K * R, in]    row (m, s, j) = lora_A row j of module m of the adapter in slot s;
                                  stored right under W's rows, in one tensor (``GroupWeight``)
    B: [n_modules * K * R, out]   row (m, s, j) = (scale * lora_B)[:, j] of that module, placed in
                                  module m's output columns (block diagonal, zeros elsewhere)

``K`` adapter slots, slot 0 being the base model (all zeros); ``R`` the largest rank loaded,
smaller ranks zero-padded (zero rows of A and B add nothing). ``scale`` (alpha / r, or
alpha / sqrt(r) for rsLoRA, per module with rank and alpha patterns) is folded into B at load.

Three ways to apply it to token rows ``x`` [T, in] whose adapters are ``slot`` [T]; all three
read the same storage, so switching is free (``set_mode``):

* ``fused`` (the default): ``[out | h] = x @ [W; A].T`` (the shrink is extra columns of the
  base matmul, which reads W anyway), then ``out[t] += h[t, rows of slot[t]] @ B[rows of
  slot[t]]`` in one Triton kernel (``kernels.expand_``) that reads only the B rows of the slots
  in the batch. Per group and layer: the (wider) base matmul and one launch, where ``dense``
  has the base matmul and three. Without Triton (CPU) the expand is ``dense``'s masked addmm.
* ``dense``: ``out = x @ W.T; out += ((x @ A.T) * onehot(slot)) @ B``: two more matmuls over
  all loaded adapters and a mask, in torch; the reference the others are tested against.
  Reading the adapters is cheap (an 8B model's r=16 all-linear adapter is 84 MB: 0.02 ms at
  4.3 TB/s), the three extra launches per group and layer are not (~1.8 ms a decode step).
* ``gather``: per module, ``bmm(x, A[slot].T) @ B[slot]``, the per-row form. Reads only the
  adapters in the batch but copies each row's A and B (B x R x (in + out) per module), which
  costs more than ``dense`` until far more adapters are loaded than a batch uses.

Loading and unloading write into these tensors in place while K and R suffice (CUDA graphs
captured over them stay valid); growing K or R reallocates A (with the base weight it shares
a tensor with) and B and bumps ``version``, which tells the graph cache to capture again; so
does the bank going from empty to not (without adapters the LoRA path is skipped: the base
linears alone, no extra columns).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loraforge.errors import AdapterError
from loraforge.serve.fast import kernels

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {m: (g, i) for g, mods in GROUPS.items() for i, m in enumerate(mods)}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


@dataclass
class LoraWeights:
    """One adapter read from disk: ``modules[(layer, module)] = (A [r, in], B [out, r], scale)``."""

    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: a key matches a module name's suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def read_peft_adapter(path: Path | str) -> LoraWeights:
    """A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``), checked.

    Refuses what the fast engine does not compute (DoRA, LoRA on embeddings or lm_head,
    ``modules_to_save``, LoRA biases) with the way out: ``serve.engine=hf`` serves them.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    way_out = "; serve it with serve.engine=hf (PEFT), or merge it (loraforge merge)"
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: a {config.get('peft_type')} adapter; the fast engine serves LoRA only{way_out}")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters are not supported by the fast engine{way_out}")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save {config['modules_to_save']} are not supported by the fast engine{way_out}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{path}: LoRA biases are not supported by the fast engine{way_out}")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{path}: fan_in_fan_out adapters (Conv1D models) are not Llama adapters{way_out}")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = _KEY.search(key)
        if found is None or found.group(2) not in MODULE_GROUP:
            raise AdapterError(f"{path}: tensor {key} is not LoRA on q/k/v/o/gate/up/down_proj{way_out}")
        pairs.setdefault((int(found.group(1)), found.group(2)), {})[found.group(3)] = tensor
    modules = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: layer {layer} {module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise AdapterError(f"{path}: layer {layer} {module}: lora_A has rank {rank}, lora_B {b.shape[1]}")
        name = f"model.layers.{layer}.{'self_attn' if module in GROUPS['qkv'] + GROUPS['o'] else 'mlp'}.{module}"
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[(layer, module)] = (a, b, scale)
    if not modules:
        raise AdapterError(f"{path}: the adapter holds no LoRA weights")
    return LoraWeights(modules)


class GroupWeight:
    """One module group's base linear (its modules fused), with the bank's LoRA A rows under it.

        weight   [out + pad(n * K * R), in]   rows :out are the base weights of the group's
                                              modules one after the other (q, k, v; gate, up),
                                              then the bank's A (``AdapterBank.A`` is a view of
                                              them), then zero rows up to a multiple of 16
                                              (keeps the matmul output's rows aligned)

    So ``x @ weight.T`` is the base output and every adapter's ``x @ A.T`` in one matmul.
    The HF model's modules keep views of the base rows (no weight is held twice); ``resize``
    moves the base to a larger tensor when the bank needs more A rows, and the modules with it.
    """

    def __init__(self, linears: list[torch.nn.Linear]):
        self.linears = linears
        self.outs = [m.weight.shape[0] for m in linears]
        self.out, self.in_features = sum(self.outs), linears[0].weight.shape[1]
        self.bounds = tuple(sum(self.outs[:i]) for i in range(1, len(self.outs)))  # first column of modules 2..n
        self.weight = linears[0].weight.detach() if len(linears) == 1 else torch.cat([m.weight.detach() for m in linears])
        self.bias = None
        if linears[0].bias is not None:
            self.bias = linears[0].bias.detach() if len(linears) == 1 else torch.cat([m.bias.detach() for m in linears])
            start = 0
            for m, rows in zip(linears, self.outs):
                m.bias = torch.nn.Parameter(self.bias[start : start + rows], requires_grad=False)
                start += rows
        self._point_modules()
        self.extended_bias = self.bias  # the bias of ``weight``: zeros for the A rows

    @property
    def base(self) -> torch.Tensor:
        return self.weight[: self.out]

    def resize(self, rows: int) -> torch.Tensor:
        """Room for ``rows`` A rows (zeros) under the base rows; returns them (a view).

        The old tensor is freed once its A rows, still referenced by the bank, are copied.
        """
        padded = -(-rows // 16) * 16
        weight = self.weight.new_empty(self.out + padded, self.in_features)
        weight[: self.out] = self.base
        weight[self.out :] = 0
        self.weight = weight
        self._point_modules()
        if self.bias is not None:
            self.extended_bias = torch.cat([self.bias, self.bias.new_zeros(padded)])
        return weight[self.out : self.out + rows]

    def _point_modules(self) -> None:
        start = 0
        for m, rows in zip(self.linears, self.outs):
            m.weight = torch.nn.Parameter(self.weight[start : start + rows], requires_grad=False)
            start += rows


class AdapterBank:
    """Stacked LoRA weights of all loaded adapters (layout in the module docstring), and the
    model's linears that apply them: ``linear(layer, group, x, step)`` = base + each row's LoRA.

    ``weights[layer][group]``: the model's ``GroupWeight``s (A lives under their base rows, so
    the bank owns their growth).
    """

    MODES = ("fused", "dense", "gather")

    def __init__(self, weights: list[dict[str, GroupWeight]], dtype: torch.dtype, device: torch.device, mode: str = "fused"):
        self.weights, self.num_layers, self.dtype, self.device = weights, len(weights), dtype, device
        self.slots: dict[str, int] = {}  # adapter name -> slot (1..K-1)
        self.K, self.R = 1, 0
        self.A = [{group: w.weight[w.out : w.out] for group, w in layer.items()} for layer in weights]
        self.B = [{group: torch.zeros(0, w.out, dtype=dtype, device=device) for group, w in layer.items()} for layer in weights]
        self.triton = kernels.usable(device, dtype)  # fused mode's expand: the Triton kernel, else torch's masked addmm
        self.version = 0  # bumped when what a captured graph read changes (K or R grew, empty or not, the mode)
        self.set_mode(mode)

    @property
    def empty(self) -> bool:
        return not self.slots

    def set_mode(self, mode: str) -> None:
        """Switch between ``fused``, ``dense`` and ``gather`` (same storage); graphs are recaptured."""
        if mode not in self.MODES:
            raise ValueError(f"lora mode {mode!r}: use one of {', '.join(self.MODES)}")
        self.mode = mode
        # linear's per-step input: the slot of each row (gather; fused with the Triton kernel), or one-hot masks
        self.by_slot = mode == "gather" or (mode == "fused" and self.triton)
        self.version += 1

    def slot_of(self, name: str | None) -> int:
        return 0 if name is None else self.slots[name]

    # ---- loading -------------------------------------------------------------------------

    def add(self, name: str, weights: LoraWeights) -> int:
        if name in self.slots:
            raise AdapterError(f"adapter {name!r} is already loaded")
        for (layer, module), (a, b, _) in weights.modules.items():
            group, m = MODULE_GROUP[module]
            w = self.weights[0][group]
            if layer >= self.num_layers or a.shape[1] != w.in_features or b.shape[0] != w.outs[m]:
                raise AdapterError(f"adapter {name!r}: layer {layer} {module} has shape A {tuple(a.shape)} B {tuple(b.shape)}, not this model's ({w.in_features} -> {w.outs[m]})")
        if self.empty:
            self.version += 1  # graphs captured without adapters have no LoRA in them
        used = set(self.slots.values())
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        self._grow(max(self.K, slot + 1), max(self.R, weights.max_rank))
        self._clear_slot(slot)
        for (layer, module), (a, b, scale) in weights.modules.items():
            group, m = MODULE_GROUP[module]
            outs = self.weights[layer][group].outs
            col = sum(outs[:m])
            r = a.shape[0]
            rows = self._rows(m, slot)
            self.A[layer][group][rows.start : rows.start + r] = a.to(self.device, self.dtype)
            self.B[layer][group][rows.start : rows.start + r, col : col + outs[m]] = (b.to(self.device, torch.float32) * scale).T.to(self.dtype)
        self.slots[name] = slot
        return slot

    def remove(self, name: str) -> None:
        slot = self.slots.pop(name)
        self._clear_slot(slot)  # its slot is reused by the next adapter loaded
        if self.empty:
            self.version += 1  # back to the base linears alone

    def _rows(self, module_index: int, slot: int) -> slice:
        start = (module_index * self.K + slot) * self.R
        return slice(start, start + self.R)

    def _clear_slot(self, slot: int) -> None:
        for layer in range(self.num_layers):
            for group, mods in GROUPS.items():
                for m in range(len(mods)):
                    self.A[layer][group][self._rows(m, slot)] = 0
                    self.B[layer][group][self._rows(m, slot)] = 0

    def _grow(self, K: int, R: int) -> None:
        """Reallocate for K slots of rank R, keeping what is loaded; one group at a time, so
        the base weights (which move with A) are never held twice."""
        if (K, R) == (self.K, self.R):
            return
        old_K, old_R = self.K, self.R
        for layer in range(self.num_layers):
            for group, w in self.weights[layer].items():
                n, fan_in = len(w.outs), w.in_features
                old_a, old_b = self.A[layer][group], self.B[layer][group]
                a = w.resize(n * K * R)
                b = torch.zeros(n * K * R, w.out, dtype=self.dtype, device=self.device)
                a.view(n, K, R, fan_in)[:, :old_K, :old_R] = old_a.view(n, old_K, old_R, fan_in)
                b.view(n, K, R, w.out)[:, :old_K, :old_R] = old_b.view(n, old_K, old_R, w.out)
                self.A[layer][group], self.B[layer][group] = a, b
                del old_a, old_b
        self.K, self.R = K, R
        self.version += 1

    # ---- applying ------------------------------------------------------------------------

    def step_inputs(self, slot: torch.Tensor) -> dict[int, torch.Tensor] | torch.Tensor | None:
        """Per-step inputs of ``linear`` for token rows whose adapters are ``slot`` [T] (long).

        ``slot`` itself for gather and for fused with the Triton kernel; else the one-hot masks
        ``{n_modules: [T, n * K * R]}``, one per group size, built once per step and shared by
        all layers. None when no adapter is loaded: the base linears alone.
        """
        if self.empty:
            return None
        if self.by_slot:
            return slot
        onehot = (slot[:, None] == torch.arange(self.K, device=slot.device)[None, :]).to(self.dtype)
        per_module = onehot[:, :, None].expand(-1, -1, self.R).reshape(slot.shape[0], self.K * self.R)
        return {n: per_module.repeat(1, n) if n > 1 else per_module for n in {len(m) for m in GROUPS.values()}}

    def linear(self, layer: int, group: str, x: torch.Tensor, step) -> torch.Tensor:
        """The group's base linear plus each row's LoRA: ``x`` [T, in] -> [T, sum of the group's outputs]."""
        w = self.weights[layer][group]
        if step is None:
            return F.linear(x, w.base, w.bias)
        A, B, n = self.A[layer][group], self.B[layer][group], len(w.outs)
        if self.mode == "fused":
            y = F.linear(x, w.weight, w.extended_bias)  # [T, out + pad(n * K * R)]: base | x @ A.T | zeros
            out, h = y[:, : w.out], y[:, w.out : w.out + A.shape[0]]
            if self.triton:
                return kernels.expand_(out, h, B, step, self.K, self.R, w.bounds)
            return out.addmm_(h * step[n], B)
        out = F.linear(x, w.base, w.bias)
        if self.mode == "dense":
            return out.addmm_((x @ A.T) * step[n], B)
        a4, b4 = A.view(n, self.K, self.R, w.in_features), B.view(n, self.K, self.R, w.out)
        col = 0
        for m, width in enumerate(w.outs):
            h = torch.bmm(x[:, None, :], a4[m][step].transpose(1, 2))  # [T, 1, R]
            out[:, col : col + width] += torch.bmm(h, b4[m][step][:, :, col : col + width])[:, 0]
            col += width
        return out
