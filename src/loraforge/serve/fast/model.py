"""Our Llama forward for serving: prefill chunks and batched decode over a static KV cache.

It runs on the weights of a loaded ``LlamaForCausalLM`` (nothing is copied twice: q/k/v and
gate/up are fused into one matrix each, ``lora.GroupWeight``, and the HF modules' weights are
re-pointed at views of the fused ones, so the HF model keeps working on the same memory; the
adapter bank stores its LoRA A rows under them and moves them when it grows). Every op that decides a
number is the one transformers' Llama uses (RMSNorm in fp32 then cast, ``rotate_half`` RoPE
with the model's own rotary module's cos/sin, SiLU-gated MLP), so greedy decoding gives the
tokens of ``generate`` (tested against it, with and without adapters).

The KV cache is one tensor, allocated once:

    cache: [layers, 2 (k, v), slots, kv_heads, cache_len, head_dim]

A running request owns one *slot*; decode row ``i`` is slot ``i`` (slots are handed out lowest
first), so the decode step reads ``cache[l, :, :b, :, :L]`` as a view, with no gather: ``b`` is
the batch bucket (highest busy slot + 1, rounded up to a power of two) and ``L`` the length
bucket (longest sequence + 1, rounded up). Rows of free slots, or of a request still in
prefill, ride along masked: they write their K/V to a scratch position
(``cache_len - 1``, never read) and attend to position 0 only, so they neither corrupt a slot nor produce NaN.

Per-slot state lives on the device (``SlotState``) and is updated there after each step, so
a decode step is: one forward with static shapes (a CUDA graph per (b, L) bucket on GPUs),
sampling on the device, and one copy of the sampled tokens to the host.

Attention uses ``scaled_dot_product_attention`` with grouped-query heads folded into the
query axis (q as [rows, kv_heads, group * queries, head_dim] against K/V as [rows, kv_heads,
L, head_dim]), so K and V are read once and never repeated per query head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraforge.serve.fast.lora import AdapterBank, GroupWeight

SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")  # position-independent inv_freq: a table works


def unsupported_reason(model) -> str | None:
    """Why the fast engine cannot serve ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} (the fast engine implements Llama: llama, SmolLM, TinyLlama, ...)"
    if hasattr(model, "peft_config"):
        return "a PEFT-wrapped model (pass the base model; adapters load into the engine)"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return "hidden_act other than silu, or pretraining_tp > 1"
    if getattr(config, "quantization_config", None) is not None:
        return "a quantized model"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope not in SUPPORTED_ROPE:
        return f"rope type {rope!r} (its frequencies depend on the sequence length)"
    return None


@dataclass
class SlotState:
    """What the decode step reads per slot, on the device (index = slot = decode row)."""

    tokens: torch.Tensor  # [S] long: the last token (input of the next decode step)
    positions: torch.Tensor  # [S] long: tokens already in the cache = position of the next one
    active: torch.Tensor  # [S] bool: decoding
    adapter: torch.Tensor  # [S] long: adapter slot, 0 = base
    temperature: torch.Tensor  # [S] float32
    top_p: torch.Tensor  # [S] float32
    seed: torch.Tensor  # [S] long
    counter: torch.Tensor  # [S] long: tokens sampled so far (the RNG counter)

    @classmethod
    def zeros(cls, slots: int, device) -> SlotState:
        z = lambda dtype: torch.zeros(slots, dtype=dtype, device=device)  # noqa: E731
        return cls(z(torch.long), z(torch.long), z(torch.bool), z(torch.long), z(torch.float32), z(torch.float32), z(torch.long), z(torch.long))


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small host list on the device without a stream sync (a pinned, non-blocking copy)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: fp32 statistics, cast back, then the weight (torch's fused norm)."""
    return weight * F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [T, heads, head_dim] rotated with ``cos``/``sin`` [T, 1, head_dim] (rotate_half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def grouped_mask(allowed: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` [B, n, L] (bool) -> the additive mask ``grouped_attention`` takes, [B, 1, G * n, L].

    Built once per forward and shared by all layers.
    """
    B, n, L = allowed.shape
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return additive[:, None, None].expand(B, 1, groups, n, L).reshape(B, 1, groups * n, L)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, n, H, d] against k, v [B, KVH, L, d] with ``mask`` from ``grouped_mask`` -> [B, n, H * d].

    The G = H / KVH query heads that share a KV head are laid along the query axis, so SDPA
    sees [B, KVH, G * n, d] queries and reads each K/V head once (for n = 1 the reshapes are
    views: no copies in decode).
    """
    B, n, H, d = q.shape
    kvh = k.shape[1]
    g = H // kvh
    qg = q.view(B, n, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(B, kvh, g * n, d)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    return out.view(B, kvh, g, n, d).permute(0, 3, 1, 2, 4).reshape(B, n, H * d)


class FusedLlama:
    """Prefill and decode for a Llama over a static KV cache of ``slots`` x ``cache_len`` positions.

    The last position of each slot is scratch (masked rows write there), so a sequence holds
    at most ``cache_len - 1`` tokens.
    """

    def __init__(self, hf_model, slots: int, cache_len: int, lora_mode: str = "fused"):
        reason = unsupported_reason(hf_model)
        if reason:
            raise ValueError(f"the fast engine cannot serve this model: {reason}")
        cfg = hf_model.config
        inner = hf_model.model
        self.device = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.slots, self.cache_len = slots, cache_len
        self.embed = inner.embed_tokens.weight.detach()
        self.norm = inner.norm.weight.detach()
        self.lm_head = hf_model.lm_head.weight.detach()
        self.layers, groups = [], []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            # qkv [q + k + v, hidden], o, gate_up [2 * intermediate, hidden], down: held by the bank
            groups.append({"qkv": GroupWeight([attn.q_proj, attn.k_proj, attn.v_proj]), "o": GroupWeight([attn.o_proj]),
                           "gate_up": GroupWeight([mlp.gate_proj, mlp.up_proj]), "down": GroupWeight([mlp.down_proj])})
            self.layers.append(LayerWeights(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()))
        self.lora = AdapterBank(groups, self.dtype, self.device, lora_mode)  # it grows them
        # cos/sin of every position, from the model's own rotary module (rope scaling included)
        with torch.no_grad():
            positions = torch.arange(cache_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(self.embed[:1][None], positions)
        self.cos, self.sin = cos[0][:, None, :], sin[0][:, None, :]  # [cache_len, 1, head_dim]
        self.cache = torch.zeros(len(self.layers), 2, slots, self.kv_heads, cache_len, self.head_dim, dtype=self.dtype, device=self.device)
        self.state = SlotState.zeros(slots, self.device)
        self._rows = torch.arange(slots, device=self.device)
        self._keys = torch.arange(cache_len, device=self.device)

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.numel() * self.cache.element_size()

    # ---- one decoder layer, shared by prefill and decode ----------------------------------

    def _layer(self, i: int, x: torch.Tensor, cos, sin, lora_step, attend) -> torch.Tensor:
        """One decoder layer; every linear is ``lora.linear``: the base, plus each row's adapter."""
        w, linear = self.layers[i], self.lora.linear
        h = rms_norm(x, w.ln1, self.eps)
        qkv = linear(i, "qkv", h, lora_step)
        T = x.shape[0]
        q_out, kv_out = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        qk = rope(qkv[:, : q_out + kv_out].view(T, self.num_heads + self.kv_heads, self.head_dim), cos, sin)  # q and k at once
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, q_out + kv_out :].view(T, self.kv_heads, self.head_dim)
        a = attend(i, q, k, v)
        x = x + linear(i, "o", a, lora_step)
        h = rms_norm(x, w.ln2, self.eps)
        gu = linear(i, "gate_up", h, lora_step)
        inter = gu.shape[1] // 2
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        return x + linear(i, "down", act, lora_step)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.norm, self.eps), self.lm_head).float()

    # ---- decode: one token for each of the first b slots ----------------------------------

    def decode(self, b: int, L: int) -> torch.Tensor:
        """Logits [b, vocab] (fp32) of the next token of slots 0..b-1, attending to L positions.

        Static shapes, no host sync, no Python loop over rows: capturable as a CUDA graph.
        """
        st = self.state
        pos, active = st.positions[:b], st.active[:b]
        write_at = torch.where(active, pos, self.cache_len - 1)  # free / prefilling rows: scratch
        last = torch.where(active, pos, 0)
        mask = grouped_mask(self._keys[None, None, :L] <= last[:, None, None], self.num_heads // self.kv_heads, self.dtype)
        cos, sin = self.cos[pos], self.sin[pos]
        rows = self._rows[:b]
        lora_step = self.lora.step_inputs(st.adapter[:b])

        def attend(i, q, k, v):
            kc, vc = self.cache[i, 0], self.cache[i, 1]
            kc[rows, :, write_at] = k
            vc[rows, :, write_at] = v
            return grouped_attention(q[:, None], kc[:b, :, :L], vc[:b, :, :L], mask)[:, 0]

        x = F.embedding(st.tokens[:b], self.embed)
        for i in range(len(self.layers)):
            x = self._layer(i, x, cos, sin, lora_step, attend)
        return self._logits(x)

    def commit(self, b: int, next_tokens: torch.Tensor) -> None:
        """After sampling: the sampled tokens become the next inputs; active rows advance one."""
        st = self.state
        st.tokens[:b] = next_tokens
        st.positions[:b] += st.active[:b]
        st.counter[:b] += st.active[:b]

    # ---- prefill: a chunk of prompt tokens of one or more requests ------------------------

    def prefill(self, pieces: list[tuple[int, list[int], int, int]], want_logits: list[int]) -> torch.Tensor | None:
        """Write the K/V of prompt pieces into their slots; logits of the pieces' last tokens.

        ``pieces``: (slot, token ids, start position, adapter slot) per request; ``want_logits``:
        indexes of the pieces whose last token's logits are returned ([len(want_logits), vocab]).
        Linear layers run over all the pieces' tokens at once; attention runs over the pieces
        padded to the longest ([pieces, longest, heads, head_dim] queries against each
        piece's slot, causal from its start position), one SDPA call per layer.
        """
        ids, positions, adapters, slot_of, piece_of, index_in = [], [], [], [], [], []
        for p, (slot, tokens, start, adapter) in enumerate(pieces):
            ids += tokens
            positions += range(start, start + len(tokens))
            adapters += [adapter] * len(tokens)
            slot_of += [slot] * len(tokens)
            piece_of += [p] * len(tokens)
            index_in += range(len(tokens))
        dev = self.device
        ids_t, pos_t, adapters_t, slot_t, piece_t, index_t = (to_device(v, dev) for v in (ids, positions, adapters, slot_of, piece_of, index_in))
        slots_t = to_device([p[0] for p in pieces], dev)
        starts_t = to_device([p[2] for p in pieces], dev)
        longest = max(len(p[1]) for p in pieces)
        L = min(self.cache_len, -(-max(p[2] + len(p[1]) for p in pieces) // 16) * 16)  # keys rounded up to 16 (masked)
        query_pos = starts_t[:, None] + torch.arange(longest, device=dev)[None, :]  # padding rows attend freely, unused
        mask = grouped_mask(self._keys[None, None, :L] <= query_pos[:, :, None], self.num_heads // self.kv_heads, self.dtype)
        cos, sin = self.cos[pos_t], self.sin[pos_t]
        lora_step = self.lora.step_inputs(adapters_t)
        # one padded query buffer for all layers: each writes the same positions, the rest stay 0
        padded = torch.zeros((len(pieces), longest, self.num_heads, self.head_dim), dtype=self.dtype, device=dev)

        def attend(i, q, k, v):
            kc, vc = self.cache[i, 0], self.cache[i, 1]
            kc[slot_t, :, pos_t] = k
            vc[slot_t, :, pos_t] = v
            padded[piece_t, index_t] = q
            out = grouped_attention(padded, kc[slots_t, :, :L], vc[slots_t, :, :L], mask)
            return out[piece_t, index_t]

        x = F.embedding(ids_t, self.embed)
        for i in range(len(self.layers)):
            x = self._layer(i, x, cos, sin, lora_step, attend)
        if not want_logits:
            return None
        ends = [0]
        for p in pieces:
            ends.append(ends[-1] + len(p[1]))
        return self._logits(x[to_device([ends[j + 1] - 1 for j in want_logits], dev)])
