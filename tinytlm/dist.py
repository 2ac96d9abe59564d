"""Data parallelism under torchrun (DDP): which process this is, and the few collective steps the two
training loops take.

    torchrun --nproc_per_node 8 train_mlm.py --ws 90000                 # one machine, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train_mlm.py ...

--batch_size stays the global batch: every process draws the whole batch (the same rows, the same
masks, from the same seeds as one process would), keeps its contiguous share of each member's rows,
and scales its loss so that DDP's mean of the gradients is the gradient of the global batch's loss
(MLM: the mean over the global batch's masked tokens; classification: over its rows). Rank 0 alone
writes logs and checkpoints; a checkpoint does not depend on the world size, so --resume works
with any. Dropout is not the single process's: each process draws its own masks (seeded by rank).
Without torchrun (WORLD_SIZE unset or 1) nothing here does anything. Several machines need one shared
filesystem for the data, --out and --resume: the global rank 0 alone prepares data and writes.
"""
import atexit
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

from tinytlm.common import UserError


class Dist:
    """This process's place in the job; one process (world 1) without torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.on = self.world > 1
        self.main = self.rank == 0

    def setup(self, device: torch.device) -> torch.device:
        """Join the process group (NCCL on CUDA, gloo on CPU); this process's device. Processes other than
        rank 0 print nothing (their stdout goes nowhere; errors still reach stderr)."""
        if not self.on:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
            atexit.register(self.close)
        if not self.main:
            sys.stdout = open(os.devnull, "w")
        return device

    def own_dropout(self):
        """Processes other than rank 0 draw their dropout masks from their own stream (rank 0 keeps the one
        a single process would use); call once the model is built and the RNG state is set."""
        if self.on and not self.main:
            torch.manual_seed((torch.initial_seed() * 1_000_003 + self.rank) % (1 << 63))

    def wrap(self, model, device, compile_mode: str):
        """DDP around the (compiled) model; compile_mode: the resolved torch.compile mode ("" = eager). CUDA
        graphs and DDP's hooks do not mix."""
        if not self.on:
            return model
        if compile_mode == "reduce-overhead":
            raise UserError("--compile reduce-overhead (CUDA graphs) does not run under torchrun; use --compile on")
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def rows(self, t: torch.Tensor, members: int, fill=None) -> torch.Tensor:
        """This process's contiguous share of each member's rows of a member-major batch (K*B, ...). A share
        that would be empty (a last batch smaller than the world) is the member's first row, filled with
        `fill` (e.g. -100: no targets) so that it adds nothing but still takes part in DDP's reduction."""
        per = t.view(members, -1, *t.shape[1:])
        mine = torch.tensor_split(per, self.world, dim=1)[self.rank]
        if mine.size(1) == 0:
            mine = per[:, :1].clone()
            if fill is not None:
                mine.fill_(fill)
        return mine.reshape(-1, *t.shape[1:])

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes, in place."""
        if self.on:
            dist.all_reduce(t)
        return t

    def any(self, flag: bool, device) -> bool:
        """True on every process when it is on any (a Ctrl-C seen at different steps stops all at one)."""
        if not self.on:
            return flag
        return bool(self.all_sum(torch.tensor([int(flag)], device=device)).item())

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (data preparation writes files), the others after it."""
        if self.on and not self.main:
            dist.barrier()
        yield
        if self.on and self.main:
            dist.barrier()

    def close(self):
        if self.on and dist.is_initialized():
            dist.destroy_process_group()
