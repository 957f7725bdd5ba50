"""Base model + LoRA: device and dtype choice, QLoRA loading, gradient checkpointing, PEFT."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys

import torch

from loraforge.config import TrainConfig
from loraforge.errors import PreflightError

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "fp32":
        return torch.float32
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.dtype == "bf16":
        if device.type == "cuda" and not bf16_ok:
            raise PreflightError("train.dtype is bf16 but this GPU does not support bf16: set train.dtype: fp32")
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else torch.float32


def load_base(model_dir, cfg: TrainConfig, device: torch.device, dtype: torch.dtype, sharded: bool = False, attn_implementation: str = "sdpa"):
    """The base model on ``device``; with ``sharded`` (FSDP) full-precision weights stay in CPU
    memory, and FSDP moves each rank's shard to its GPU layer by layer. A 4-bit base loads on
    the GPU (about 0.55 byte a parameter) with its packed weights in bf16 containers, which
    FSDP shards like any other tensor."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if cfg.quantization == "nf4":
        if device.type != "cuda":
            raise PreflightError("QLoRA (train.quantization: nf4) needs a CUDA GPU; on CPU leave train.quantization unset")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16 if sharded else torch.uint8,
        )
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if cfg.quantization is None and not sharded:
        model.to(device)
    return model


def apply_accelerations(model, cfg: TrainConfig, device: torch.device) -> list[str]:
    """Switch on installed GPU kernels (Liger) unless train.accelerations is false."""
    if not cfg.accelerations or device.type != "cuda":
        return []
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return []
    try:
        with instance_only(model):
            _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as exc:  # an incompatible version must not cost the run: train without it
        log.warning("Liger kernels are installed but could not be applied (%s); training without them", exc)
        return [f"liger: not applied ({type(exc).__name__})"]
    return ["liger: rope, rms_norm, swiglu"]


@contextlib.contextmanager
def instance_only(model):
    """Patches meant for ``model`` stay with it as far as they can. Liger's apply-to-instance
    also replaces names in the model family's transformers module (``LlamaRMSNorm``,
    ``LlamaMLP``, ``apply_rotary_pos_emb``) for every model built afterwards in the process,
    CPU ones included, where its Triton kernels fail. The instance's modules are patched one
    by one, so the modules' classes are put back afterwards. A replaced function, which the
    instance's own code looks up in the module at each call (the rotary embedding), cannot be:
    it goes to the new one for CUDA tensors and to the one it replaced for others, so a later
    CUDA model of the family also gets Liger's rotary embedding (the same values)."""
    modules = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__module__.startswith("transformers.models.")}
    before = {module: dict(vars(module)) for module in modules}
    try:
        yield
    finally:
        for module, names in before.items():
            for name, value in list(vars(module).items()):
                old = names.get(name)
                if old is None or old is value:
                    continue
                if isinstance(old, type):
                    setattr(module, name, old)
                elif callable(old):
                    setattr(module, name, _on_cuda(value, old))


def _on_cuda(cuda_fn, other_fn):
    @functools.wraps(other_fn)
    def dispatch(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        return (cuda_fn if first is not None and first.is_cuda else other_fn)(*args, **kwargs)

    return dispatch


def wrap_lora(model, cfg: TrainConfig, checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    # No prepare_model_for_kbit_training for QLoRA: it copies every non-quantized weight to fp32
    # (norms, embeddings, the LM head: 2 GiB more for an 8B Llama, and fp32 hidden states after
    # each norm); bf16 compute keeps them as loaded. The frozen base is frozen by get_peft_model.
    if checkpointing:
        # every layer set up for checkpointing; train.memory.apply then switches single layers
        # off and gives the others its own recompute function (offloading or not)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = cfg.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.rslora,
        use_dora=lora.dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config, autocast_adapter_dtype=cfg.adapter_dtype != "model")
    model.train()  # from_pretrained returns eval mode, which silently disables checkpointing
    return model


def linear_module_names(model) -> set[str]:
    """Short names of the linear layers LoRA can target (q_proj, ..., not lm_head)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            short = name.rsplit(".", 1)[-1]
            if short != "lm_head":
                names.add(short)
    return names
