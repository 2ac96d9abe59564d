"""The rows the sparse MLM head reads: the chosen positions of a batch and their targets.

The MLM loss only needs the logits at the ~15% chosen positions, so the head (a (H, V) matmul, the
largest of a small model) runs on those rows only. The training loop and the held-out evaluation choose
them here, outside the model, and hand the model flat positions:

    rows, y = mlm_rows(targets, slots, members=K)   # rows (N,) into the (B*T) positions, y (N,) targets
    counts, loss = model(inputs, attention_mask, targets=y, rows=rows)   # counts (K, 3), no logits

slots=0: every chosen position, in row-major order (a dynamic N: one host sync). K members: N slots per
member (the most any member chose), a member with fewer filled with unchosen positions whose target is
-100, so every member's slab has the same number of rows (tinytlm/members.py's Linear needs it).
slots=k: k per row, chosen positions first, filled with unchosen ones (target -100, ignored by the loss):
N = B*k, a static shape, no host sync, so CUDA graphs can replay the step (`--mask_cap k`).
"""
import torch


def mlm_rows(targets: torch.Tensor, slots: int = 0, members: int = 1) -> tuple:
    """(rows (N,) long, flat positions into the (B*T) positions of targets' batch; their targets (N,)).
    targets (B, T): the original id at the chosen positions, -100 elsewhere; B = K*B' rows member-major."""
    chosen = targets != -100  # (B, T)
    B, T = chosen.shape
    if slots:  # static: k per row
        pos = chosen.float().topk(slots, dim=1, sorted=False).indices  # (B, k), column in its row
        rows = pos + torch.arange(B, device=pos.device)[:, None] * T  # (B, k)
    else:  # dynamic: the chosen ones of each member, in row-major order
        chosen = chosen.view(members, -1)  # (K, B'*T)
        n = int(chosen.sum(1).max())  # syncs once
        pos = chosen.float().sort(dim=1, descending=True, stable=True).indices[:, :n]  # (K, N)
        rows = pos + torch.arange(members, device=pos.device)[:, None] * chosen.size(1)  # (K, N)
    rows = rows.reshape(-1)  # (N,) member-major
    return rows, targets.reshape(-1)[rows]
