"""Held-out MLM evaluation: "is my MLM learning?" on rows no pre-training ever sees.

The validation rows are the last min(2,000, n/10) of the shuffled Wikipedia order (wiki.val.bin, see
tinytlm/wikipedia.py); no W_s prefix reaches them. Their masks are drawn once, on the CPU, from a fixed
seed, so every run, every epoch and every device scores the same positions. The model runs in eval mode
(no dropout) and draws no random numbers: a run with evaluation trains bitwise as one without.
"""
import numpy as np
import torch

from tinytlm.data import mask_tokens
from tinytlm.mlm_rows import mlm_rows
from tinytlm.precision import autocast

VAL_SEED = 20260101  # the validation masks' seed: the same for every run


class HeldOut:
    """The validation rows and their fixed masks (CPU tensors, moved to the device a batch at a time)."""

    def __init__(self, shard, special_ids: dict, vocab_size: int, batch_size: int = 256):
        self.ids = torch.from_numpy(np.asarray(shard.ids).astype(np.int64))
        g = torch.Generator().manual_seed(VAL_SEED)
        self.inputs, self.targets = mask_tokens(self.ids, g, vocab_size=vocab_size, mask_id=special_ids["mask"],
                                                special_ids=tuple(special_ids.values()))
        self.pad, self.batch_size = special_ids["pad"], batch_size

    def __len__(self):
        return len(self.ids)

    @torch.no_grad()
    def evaluate(self, model, device, members: int = 1, precision: str = "fp32") -> list:
        """Per member: {"val_loss", "val_mlm_acc", "val_masked"} over every held-out masked token (the loss
        is the mean over those tokens, as the training loss is per step). model: a BertForMLM, stacked or not;
        precision: "fp32" | "bf16", the run's (tinytlm/precision.py)."""
        if len(self) == 0:
            return [{} for _ in range(members)]
        was = model.training
        model.eval()
        sums = torch.zeros(members, 3, dtype=torch.float64)  # loss sum, correct, predictions
        try:
            for i in range(0, len(self), self.batch_size):
                x, inp, tgt = (t[i:i + self.batch_size].repeat(members, 1).to(device)  # member-major
                               for t in (self.ids, self.inputs, self.targets))
                rows, y = mlm_rows(tgt, 0, members)  # the chosen positions, N per member
                # counts (K, 3): loss sum (0 for a batch without masks), correct, masked
                with autocast(device, precision):
                    counts, _ = model(inp, attention_mask=x != self.pad, targets=y, rows=rows)
                sums += counts.double().cpu()
        finally:
            model.train(was)
        return [{"val_loss": s[0] / max(1.0, s[2]), "val_mlm_acc": s[1] / max(1.0, s[2]), "val_masked": int(s[2])}
                for s in sums.tolist()]
