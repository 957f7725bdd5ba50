"""Typed configuration of every stage, in one place.

One YAML file holds it all (each stage reads its own section); CLI flags override single keys
by their dotted path (``gate.max_seq_length``). Unknown keys are refused and every value is
type-checked, so a typo fails at start-up, not after an hour of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraforge.errors import ConfigError

EMBEDDED_DEFAULT_MODEL = "smollm2-135m-instruct"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # The embedded default runs everywhere with no download; any local HF model directory works.
    name: str = EMBEDDED_DEFAULT_MODEL


# ---- gate --------------------------------------------------------------------------------


class TooShortConfig(_Section):
    enabled: bool = True
    # Real instruction data has one-token answers ("1", "True", "Negative"): by default only an
    # answer without any letter or digit (".", "...", "-") is too short. Raise these for tasks
    # whose answers must be long.
    min_chars: int | None = Field(default=None, ge=1)
    min_words: int | None = Field(default=None, ge=1)


class RepetitionConfig(_Section):
    """Degenerate, looping assistant text. Calibrated on real chat data (see gate/repetition.py).

    Each threshold can be switched off with ``null``.
    """

    enabled: bool = True
    # Gopher's n-gram rules were set for web pages of 50+ words; below this many words an answer
    # is too short for n-gram fractions to mean anything (a 12-word answer repeats "of the").
    min_words: int = Field(default=60, ge=1)
    # Fraction of characters inside the most frequent n-gram, n = 2, 3, 4 (Gopher: .20/.18/.16;
    # on the shared Alpaca answers of 60+ words the maxima are .24/.29/.34, a templated list).
    top_ngram_char_frac: dict[int, float] | None = Field(
        default_factory=lambda: {2: 0.35, 3: 0.35, 4: 0.40}
    )
    # Fraction of characters inside n-grams that occur more than once, n = 5..10
    # (Gopher: .15 .. .10). Song choruses, outlines and chord charts repeat legitimately: on the
    # shared Alpaca answers the 99th percentile is .39 (n=5) and the maximum .58.
    dup_ngram_char_frac: dict[int, float] | None = Field(
        default_factory=lambda: {5: 0.65, 6: 0.62, 7: 0.60, 8: 0.58, 9: 0.56, 10: 0.55}
    )
    # Fraction of non-trivial lines that repeat an earlier line (Gopher: 0.30).
    dup_line_frac: float | None = Field(default=0.5, ge=0, le=1)
    # Minimum non-trivial lines before the duplicate-line rule applies.
    min_lines: int = Field(default=4, ge=2)
    # A loop: the same phrase of 1..max_loop_period words repeated back to back loop_repeats
    # times, spanning at least loop_min_words words ("no, no, no" is fine; a sentence said three
    # times over is not). Applies at any length: the failure mode of a degenerate model.
    loop_repeats: int | None = Field(default=3, ge=2)
    loop_min_words: int = Field(default=12, ge=2)
    max_loop_period: int = Field(default=32, ge=1)
    # The same character repeated this many times in a row ("!!!!!!..."), ignoring
    # whitespace, table and rule characters.
    char_run: int | None = Field(default=40, ge=2)


class SpecialTokenConfig(_Section):
    enabled: bool = True
    # Further marker strings to refuse inside message content.
    extra_markers: list[str] = Field(default_factory=list)


class LengthConfig(_Section):
    enabled: bool = True


class DedupConfig(_Section):
    exact: bool = True
    near: bool = True
    # Jaccard similarity of word 5-gram sets above which two samples are near duplicates.
    near_threshold: float = Field(default=0.85, gt=0, lt=1)
    # More permutations: a sharper threshold, slower, and num_perm bytes a kept sample to
    # verify LSH hits. 128 keeps the similarity estimate within about +-0.04.
    num_perm: int = Field(default=128, ge=16, le=512)
    shingle_words: int = Field(default=5, ge=1)


class EvalOverlapConfig(_Section):
    # Decontamination is on as soon as eval files are given.
    files: list[Path] = Field(default_factory=list)
    ngram: int = Field(default=13, ge=4)


PiiKind = Literal["email", "phone", "ip", "api_key"]


class PiiConfig(_Section):
    # off: not checked; flag: kept and listed in kept.jsonl; drop: rejected; redact: replaced.
    mode: Literal["off", "flag", "drop", "redact"] = "off"
    kinds: list[PiiKind] = Field(default_factory=lambda: ["email", "phone", "ip", "api_key"])


class GateChecksConfig(_Section):
    empty_response: bool = True
    too_short: TooShortConfig = Field(default_factory=TooShortConfig)
    role_order: bool = True
    special_token: SpecialTokenConfig = Field(default_factory=SpecialTokenConfig)
    repetition: RepetitionConfig = Field(default_factory=RepetitionConfig)
    length: LengthConfig = Field(default_factory=LengthConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    eval_overlap: EvalOverlapConfig = Field(default_factory=EvalOverlapConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)


class GateConfig(_Section):
    # Samples longer than this (rendered with the model's own chat template) are rejected.
    max_seq_length: int = Field(default=2048, ge=16)
    # Worker processes; null: one per core. Output order never depends on it.
    workers: int | None = Field(default=None, ge=1)
    # Records per work unit sent to a worker: larger amortizes IPC, smaller smooths progress.
    chunk_size: int = Field(default=256, ge=1)
    checks: GateChecksConfig = Field(default_factory=GateChecksConfig)


# ---- train -------------------------------------------------------------------------------


class LoraSection(_Section):
    """out = W x + (alpha / r) * B(A(x)); B starts at zero, so step 0 is the base model."""

    # Higher rank: more capacity, more memory. 8-64 covers style and structure tasks.
    r: int = Field(default=16, ge=1)
    # A scale, not a shape: any value is accepted; alpha / r far outside 1-4 gets a warning.
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # Module names (q_proj, v_proj, ...) or "all-linear" (every linear layer but the LM head).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # rsLoRA scales by alpha / sqrt(r): stable at high ranks. DoRA: magnitude/direction split, slower.
    rslora: bool = False
    dora: bool = False


class TrainConfig(_Section):
    # Gate output (kept.jsonl) is used as is; any other file is gated in-process first.
    data: Path | None = None
    # Held-out data: a file, or else this fraction of the training data (0: no eval).
    eval_data: Path | None = None
    eval_fraction: float = Field(default=0.05, ge=0, lt=1)
    out: Path = Path("runs/latest")
    max_seq_length: int = Field(default=2048, ge=16)
    # Packing fills each sequence with several samples (never across max_seq_length, never
    # attending across sample boundaries). Off: one sample per sequence, padded.
    packing: bool = True
    micro_batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    # Stop after max_steps optimizer steps if set, else after `epochs` passes over the data.
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float = Field(default=1.0, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    lora: LoraSection = Field(default_factory=LoraSection)
    # nf4: QLoRA, 4-bit NF4 base weights via bitsandbytes (CUDA only), double quant, bf16 compute.
    quantization: Literal["nf4"] | None = None
    # auto: bf16 on GPUs that support it, fp32 on CPU.
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # Recompute activations in backward: ~30% slower for the layers recomputed, much less memory.
    # true / false: every layer / none. null: the memory planner recomputes only the layers whose
    # activations do not fit train.memory_budget_gib (shown by --dry-run).
    gradient_checkpointing: bool | None = None
    # The planner's budget (null: 90% of the device's free memory). A lower budget trades speed
    # for memory: at the lowest, every layer is recomputed and its input offloaded to CPU memory.
    memory_budget_gib: float | None = Field(default=None, gt=0)
    # Checkpointed layers keep their input in pinned CPU memory (CUDA). null: only when recomputing
    # every layer still exceeds the budget.
    offload_activations: bool | None = None
    # Offloaded layers also keep their attention's inputs and outputs in CPU memory (varlen
    # attention), so their recomputation runs no attention kernel, nor (grouped fused LoRA,
    # Llama / Mistral / Qwen2 layers: no q/k norms) the q/k/v base matmuls.
    keep_attention: bool = True
    # varlen: padding-free packing, a micro-batch's samples in one flat row and flash varlen
    # attention confined to each sample (CUDA). sdpa: padded rows with a block mask (any device).
    # auto: varlen where the kernel exists.
    attention: Literal["auto", "varlen", "sdpa"] = "auto"
    # The loss straight from the last hidden states, chunk by chunk, never the whole logits tensor
    # (Liger's kernel when installed). null: on CUDA.
    fused_loss: bool | None = None
    # Base matmul and LoRA product in one autograd function, in the compute dtype, one saved input
    # (train.fused_lora). null: on CUDA. Layers with dropout, DoRA or biases keep PEFT's forward.
    fused_lora: bool | None = None
    # The fused projections that read one input (q/k/v, gate/up) as one function: one LoRA A
    # product and the input gradient summed inside the GEMMs, wherever fused_lora is on, in
    # Llama, Mistral and Qwen decoder layers. false: each projection alone.
    grouped_lora: bool = True
    # QLoRA: the fused layers dequantize their NF4 base weights with loraforge's one-kernel Triton
    # path (train.nf4) where triton is installed; false: bitsandbytes' own dequantization.
    nf4_kernel: bool = True
    # LoRA weights, their gradients and AdamW state: fp32 (PEFT's default: exact small updates, and
    # PEFT casts each LoRA input to fp32) or the base model's dtype (bf16 on GPU: half the memory
    # and traffic of the adapter path, updates rounded to bf16). null: fp32, unless the memory
    # budget holds the run only with the model's dtype (the plan says so).
    adapter_dtype: Literal["fp32", "model"] | None = None
    # Liger kernels and the like, when installed (GPU only). False switches them off.
    accelerations: bool = True
    checkpoint_every: int = Field(default=50, ge=1)
    eval_every: int = Field(default=50, ge=1)
    # Stop when eval loss has not improved for this many evaluations (null: never).
    early_stopping_patience: int | None = Field(default=None, ge=1)
    # Stop when the loss exceeds spike_factor x its running average (after spike_warmup steps).
    spike_factor: float = Field(default=4.0, gt=1)
    spike_warmup: int = Field(default=10, ge=1)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # More than one process (--gpus N or torchrun): ddp replicates the model on each GPU (fastest
    # when it fits), fsdp shards base weights, LoRA and optimizer state per decoder layer (for
    # models that do not fit one GPU). auto: the preflight memory estimate picks and says why.
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"


# ---- serve -------------------------------------------------------------------------------


class ServeConfig(_Section):
    # Loopback unless told otherwise: an inference server is not a public service by default.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # name -> run directory or adapter directory, loaded at start-up
    adapters: dict[str, Path] = Field(default_factory=dict)
    # POST /v1/adapters loads only from below this directory (null: loading while serving is off)
    adapter_root: Path | None = None
    # Bearer key for every endpoint but /health (null: no authentication); env LORAFORGE_API_KEY
    api_key: str | None = None
    # Bearer key for POST/DELETE /v1/adapters (null: those endpoints are off); env LORAFORGE_ADMIN_KEY
    admin_key: str | None = None
    # Requests decoded together in one batch: more throughput, more latency per token.
    max_batch_size: int = Field(default=8, ge=1)
    # Waiting requests beyond this get 429 with Retry-After instead of unbounded latency.
    max_queue: int = Field(default=64, ge=1)
    request_timeout_s: float = Field(default=120, gt=0)
    max_tokens_limit: int = Field(default=2048, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # fast: our Llama engine (continuous batching, static KV cache, batched LoRA, CUDA graphs);
    # hf: transformers + PEFT, any model, the reference; auto: fast where it supports the model.
    engine: Literal["auto", "fast", "hf"] = "auto"
    # fast engine: tokens per request (prompt + max_tokens) in its KV cache, which holds
    # max_batch_size x this many (an 8B Llama: 128 KiB a token in bf16); null: min(4096, model's).
    max_seq_len: int | None = Field(default=None, ge=16)
    # fast engine: prompt tokens computed per step; a decode step runs between chunks, so no
    # request waits behind more than one chunk of a long prompt. Larger: faster prefill, jerkier decode.
    prefill_chunk: int = Field(default=512, ge=16)
    # fast engine on CUDA: capture the decode step as CUDA graphs (one per batch and length bucket)
    cuda_graphs: bool = True


class LoraforgeConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{key}' is a value, not a section")
        node = child
    node[leaf] = value


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> LoraforgeConfig:
    """Read the YAML file (if any), apply dotted-key overrides (``None`` values are skipped), validate."""
    tree: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, gate:, ...)")
        tree = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    try:
        return LoraforgeConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}: invalid configuration: {problems}") from exc
