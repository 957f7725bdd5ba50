"""Batched LoRA: every loaded adapter stacked, so one batch mixes adapters in one matmul pass.

PEFT serves a mixed batch by looping over the adapters present and running each sub-batch
through its own small matmuls, in every linear layer. Here the adapters' weights live in a
few stacked tensors and each row picks its adapter by a slot index; the decode step has no
Python loop over rows or adapters and keeps static shapes (so it can be a CUDA graph).

Memory layout, per decoder layer, per *group* of target modules that read the same input
(the base weights are fused the same way: ``model.FusedLlama``):

    group     modules                       input
    qkv       q_proj, k_proj, v_proj        the attention RMSNorm's output
    o         o_proj                        the attention output
    gate_up   gate_proj, up_proj            the MLP RMSNorm's output
    down      down_proj                     silu(gate) * up

    A: [n_modules * K * R, in]    row (m, s, j) = lora_A row j of module m of the adapter in slot s
    B: [n_modules * K * R, out]   row (m, s, j) = (scale * lora_B)[:, j] of that module, placed in
                                  module m's output columns (block diagonal, zeros elsewhere)

``K`` adapter slots, slot 0 being the base model (all zeros); ``R`` the largest rank loaded,
smaller ranks zero-padded (zero rows of A and B add nothing). ``scale`` (alpha / r, or
alpha / sqrt(r) for rsLoRA, per module with rank and alpha patterns) is folded into B at load.

Two ways to apply it to token rows ``x`` [T, in] whose adapters are ``slot`` [T]:

* ``dense`` (the default): ``out += ((x @ A.T) * onehot(slot)) @ B``: two matmuls over all
  loaded adapters and a mask. Decode is memory-bound, and this reads each adapter's weights
  once a step (an 8B model's r=16 all-linear adapter is 84 MB: 0.02 ms at 4.3 TB/s), whatever
  the batch; its cost grows with the number of *loaded* adapters times R.
* ``gather``: per module, ``bmm(x, A[slot].T) @ B[slot]``, the per-row form. Reads only the
  adapters in the batch but copies each row's A and B (B x R x (in + out) per module), which
  costs more than ``dense`` until far more adapters are loaded than a batch uses.

Loading and unloading write into these tensors in place while K and R suffice (CUDA graphs
captured over them stay valid); growing K or R reallocates and bumps ``version``, which
tells the graph cache to capture again.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.errors import AdapterError

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


class AdapterBank:
    """Stacked LoRA weights of all loaded adapters (layout in the module docstring).

    ``dims[group] = (in_features, [out_features of each module])`` for the model's layers.
    """

    def __init__(self, num_layers: int, dims: dict[str, tuple[int, list[int]]], dtype: torch.dtype, device: torch.device, mode: str = "dense"):
        self.num_layers, self.dims, self.dtype, self.device, self.mode = num_layers, dims, dtype, device, mode
        self.slots: dict[str, int] = {}  # adapter name -> slot (1..K-1)
        self.K, self.R = 1, 0
        self.A: list[dict[str, torch.Tensor]] = []
        self.B: list[dict[str, torch.Tensor]] = []
        self.version = 0  # bumped when what a captured graph read changes (K or R grew, the mode)
        self.set_mode(mode)

    @property
    def empty(self) -> bool:
        return not self.slots

    def set_mode(self, mode: str) -> None:
        """Switch between ``dense`` and ``gather`` (same storage); captured graphs are recaptured."""
        if mode not in ("dense", "gather"):
            raise ValueError(f"lora mode {mode!r}: use 'dense' or 'gather'")
        self.mode = mode
        self.version += 1

    def slot_of(self, name: str | None) -> int:
        return 0 if name is None else self.slots[name]

    # ---- loading -------------------------------------------------------------------------

    def add(self, name: str, weights: LoraWeights) -> int:
        if name in self.slots:
            raise AdapterError(f"adapter {name!r} is already loaded")
        for (layer, module), (a, b, _) in weights.modules.items():
            group, _ = MODULE_GROUP[module]
            fan_in, outs = self.dims[group]
            out = outs[GROUPS[group].index(module)]
            if layer >= self.num_layers or a.shape[1] != fan_in or b.shape[0] != out:
                raise AdapterError(f"adapter {name!r}: layer {layer} {module} has shape A {tuple(a.shape)} B {tuple(b.shape)}, not this model's ({fan_in} -> {out})")
        used = set(self.slots.values())
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        self._grow(max(self.K, slot + 1), max(self.R, weights.max_rank))
        self._clear_slot(slot)
        for (layer, module), (a, b, scale) in weights.modules.items():
            group, m = MODULE_GROUP[module]
            outs = self.dims[group][1]
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
        if (K, R) == (self.K, self.R) and self.A:
            return
        old_A, old_B, old_K, old_R = self.A, self.B, self.K, self.R
        self.A, self.B = [], []
        for layer in range(self.num_layers):
            a_layer, b_layer = {}, {}
            for group, (fan_in, outs) in self.dims.items():
                n = len(outs)
                a = torch.zeros(n, K, R, fan_in, dtype=self.dtype, device=self.device)
                b = torch.zeros(n, K, R, sum(outs), dtype=self.dtype, device=self.device)
                if old_A:
                    a[:, :old_K, :old_R] = old_A[layer][group].view(n, old_K, old_R, fan_in)
                    b[:, :old_K, :old_R] = old_B[layer][group].view(n, old_K, old_R, sum(outs))
                a_layer[group], b_layer[group] = a.view(n * K * R, fan_in), b.view(n * K * R, sum(outs))
            self.A.append(a_layer)
            self.B.append(b_layer)
        self.K, self.R = K, R
        self.version += 1

    # ---- applying ------------------------------------------------------------------------

    def masks(self, slot: torch.Tensor) -> dict[int, torch.Tensor] | torch.Tensor | None:
        """Per-step inputs of ``apply`` for token rows whose adapters are ``slot`` [T] (long).

        dense: ``{n_modules: onehot mask [T, n * K * R]}``, one per group size, built once per
        step and shared by all layers; gather: ``slot`` itself. None when no adapter is loaded.
        """
        if self.empty:
            return None
        if self.mode == "gather":
            return slot
        onehot = (slot[:, None] == torch.arange(self.K, device=slot.device)[None, :]).to(self.dtype)
        per_module = onehot[:, :, None].expand(-1, -1, self.R).reshape(slot.shape[0], self.K * self.R)
        return {n: per_module.repeat(1, n) if n > 1 else per_module for n in {len(m) for m in GROUPS.values()}}

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor, masks) -> torch.Tensor:
        """``out + LoRA(x)`` for token rows ``x`` [T, in], ``out`` [T, sum of the group's outputs]."""
        if masks is None:
            return out
        A, B = self.A[layer][group], self.B[layer][group]
        if self.mode == "dense":
            h = (x @ A.T) * masks[len(GROUPS[group])]
            return out.addmm_(h, B)
        n, fan_in, total = len(GROUPS[group]), A.shape[1], B.shape[1]
        outs = self.dims[group][1]
        a4, b4 = A.view(n, self.K, self.R, fan_in), B.view(n, self.K, self.R, total)
        col = 0
        for m, width in enumerate(outs):
            h = torch.bmm(x[:, None, :], a4[m][masks].transpose(1, 2))  # [T, 1, R]
            out[:, col : col + width] += torch.bmm(h, b4[m][masks][:, :, col : col + width])[:, 0]
            col += width
        return out
