"""More than one process: PyTorch's own engine (DDP or FSDP2), started by torchrun.

loraforge starts no processes of its own: ``loraforge train --gpus N`` replaces itself with
``python -m torch.distributed.run --standalone --nproc-per-node N -m loraforge.cli train ...``
(the same arguments; ``launch.py``), and a cluster runs ``torchrun`` (or ``accelerate
launch``) on each node. Every process reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` from
the environment torchrun sets and joins the process group: NCCL on CUDA (one GPU per
process), gloo on CPU (N CPU processes: how the tests run two ranks on a machine without GPUs).

One optimizer step, W processes, micro-batch size m, grad_accum a
---------------------------------------------------------------------
The global batch is ``m x a x W`` rows. Step s takes the same rows as a single process with
micro-batch m and grad_accum ``a x W`` (``global_micro_batches``, a pure function of seed,
epoch and step, computed identically on every rank); rank r takes micro-batches
``r, r + W, r + 2W, ...`` of that list (``shard_micro_batches``: disjoint, together complete,
deterministic). Every rank holds the whole tokenized data set, so each knows the supervised
token count N of the *whole* step without communicating. Rank r back-propagates

    L_r = W * (sum of token cross-entropy over its rows) / N

and DDP (or FSDP's reduce-scatter) averages gradients over ranks:

    (1/W) * sum_r grad L_r = sum_r grad(CE_r) / N = grad(sum of all CE / N)

which is exactly the single-process gradient of the step, whatever the packing makes of each
micro-batch (no attention crosses rows, so a row's loss does not depend on its neighbours).
A rank left with fewer micro-batches (the last, short step of an epoch) runs padding passes
whose loss is 0: every rank runs the same number of forward/backward passes, which FSDP's
per-layer collectives need.

Strategy
--------
``ddp`` when the model fits on one GPU (each rank holds all weights; only LoRA gradients
travel), ``fsdp`` (``fully_shard`` per decoder layer, then the root) when it does not: base
weights, LoRA weights, gradients and AdamW state are sharded over the ranks, and each decoder
layer is gathered just in time. The preflight's memory estimate picks (``preflight.plan_strategy``);
``train.distributed`` forces one. Sharding per decoder layer keeps each FSDP group's frozen
base and trainable LoRA parameters together, which FSDP2 handles (only parameters with
gradients are reduce-scattered). QLoRA under FSDP stores the 4-bit weights in bf16 containers
(``bnb_4bit_quant_storage``) so they shard like any other tensor.

Checkpoints gather everything to full, unsharded tensors keyed by parameter name (PyTorch's
``torch.distributed.checkpoint.state_dict``), written by rank 0, so they load on any number of
processes; the adapter is plain PEFT format. Metrics: rank 0 gathers every rank's GPU memory
and utilization each step (one small all-gather, together with the loss) and serves them with
a ``rank`` label on the one Prometheus port: one endpoint to scrape, whatever the world size.
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext

import torch

from loraforge.errors import ConfigError
from loraforge.train.launch import Dist
from loraforge.train.model import pick_device


def device_of(ctx: Dist) -> torch.device:
    """This process's device: GPU ``LOCAL_RANK`` (one GPU a process), or the CPU."""
    if not ctx.enabled:
        return pick_device()
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init(ctx: Dist) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU) and return this process's device."""
    import torch.distributed as dist

    device = device_of(ctx)
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"{ctx.local_world} processes on this node but {torch.cuda.device_count()} GPU(s) visible (CUDA_VISIBLE_DEVICES?): one GPU a process")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def shutdown(ctx: Dist) -> None:
    import torch.distributed as dist

    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


# ---- data ---------------------------------------------------------------------------------


def shard_micro_batches(micro: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Rank ``rank``'s micro-batches of a global step: every ``world``-th, from ``rank`` on.

    Disjoint across ranks, complete together, deterministic; each rank gets
    ``ceil(len(micro) / world)`` entries, the missing ones as ``[]`` (a padding pass with no
    rows and no loss), so every rank runs the same number of forward/backward passes.
    """
    mine = micro[rank::world]
    return mine + [[] for _ in range(math.ceil(len(micro) / world) - len(mine))]


def gather_stats(ctx: Dist, values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (one all-gather), as one list per rank; no collective for one process."""
    if not ctx.enabled:
        return [list(values)]
    import torch.distributed as dist

    local = torch.tensor(values, dtype=torch.float64, device=device)
    everyone = [torch.empty_like(local) for _ in range(ctx.world)]
    dist.all_gather(everyone, local)
    return [t.tolist() for t in everyone]


def sum_over_ranks(ctx: Dist, values: list[float], device: torch.device) -> list[float]:
    if not ctx.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---- the model ------------------------------------------------------------------------------


def decoder_layers(model, required: bool = True) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes); none
    known: a ConfigError, or ``[]`` when not ``required``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers and required:
        raise ConfigError(f"{type(base).__name__} names no decoder layer class (_no_split_modules): FSDP cannot shard it per layer; use train.distributed: ddp")
    return layers


def wrap(model, strategy: str, ctx: Dist, device: torch.device):
    """The module each step calls: ``model`` itself (one process, or FSDP2, which shards in
    place) or a DDP wrapper around it. ``model`` stays the PEFT model for saving."""
    if not ctx.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # no buffer broadcast per forward: buffers (rotary tables) are identical on every rank
        # (the name of the switch changed in torch 2.13)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        # every rank loaded the same frozen base: broadcasting it from rank 0 at start would only cost time
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ctx.world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, LM head
    return model


def no_sync(engine, last: bool):
    """DDP: all-reduce only after the rank's last micro-batch of the step (one all-reduce a step)."""
    if last or not hasattr(engine, "no_sync"):
        return nullcontext()
    return engine.no_sync()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip by the global gradient norm (sharded FSDP gradients included); returns the norm, a
    0-d tensor on the gradients' device (reading it waits for the GPU)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(norm, "full_tensor"):  # a DTensor: the norm of this rank's shards, made global
        norm = norm.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ---- checkpoints ----------------------------------------------------------------------------


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters as full CPU tensors keyed by parameter name. Under FSDP
    each is all-gathered from its shards (a collective: every rank calls this). Only trainable
    parameters: a 4-bit base's quantization state never travels."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = full.detach().cpu()
    return state


def full_optimizer_state(model, optimizer) -> dict:
    """AdamW state gathered to full tensors keyed by parameter name (on rank 0; empty on the
    others), PyTorch's distributed-checkpoint format: loads on any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state; each rank keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
