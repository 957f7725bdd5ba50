"""Which process am I, and starting N of them: torchrun's environment, torchrun itself.

Kept free of torch imports: ``loraforge train --gpus N`` decides to relaunch before paying for
them (each of the N processes imports torch anyway).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from loraforge.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: world size, global rank, rank on its node."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return cls(world, int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), local_world)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process with torchrun running ``loraforge <argv>`` in ``nproc`` processes.

    ``--standalone``: a rendezvous on this machine only (multi-node runs call torchrun with
    ``--nnodes`` and ``--rdzv-endpoint`` themselves; see the README). The child processes see
    WORLD_SIZE and do not relaunch.
    """
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "loraforge.cli", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, args)


def check_launch(gpus: int | None, ctx: Dist) -> None:
    """Under torchrun, --gpus (if given) must match the processes started on this node."""
    if ctx.enabled and gpus is not None and gpus != ctx.local_world:
        raise ConfigError(f"--gpus {gpus}, but torchrun started {ctx.local_world} processes on this node: leave --gpus out under torchrun")
