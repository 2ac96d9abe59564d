"""The MLM decoder and its cross-entropy in one op that never holds all (N x V) logits at once.

The sparse MLM head ends in a decoder to the 30,522 word ids and a cross-entropy. Done plainly
(`reference` below) the logits of every chosen position, N x V floats, are written, read by log-softmax,
written again as their gradient and read twice more in the backward: at batch 128 on `tiny` that is
~300 MB per pass, far out of any CPU cache. Here the rows go through in chunks of `chunk`: per chunk the
logits are made, their log-sum-exp, loss and argmax taken, and, when a gradient is wanted, the softmax
minus the one-hot turned at once into this chunk's gradients of the hidden states, the decoder weight and
its bias (as Liger-Kernel's fused linear cross-entropy does). The backward then only scales those by the
incoming gradient, so the decoder's matrix products are the same three as the plain path's, and each
chunk's logits stay in cache between them.

K stacked members (tinytlm/members.py) are one batched call: x (K, N, H), weight (K, V, H) or one shared
(V, H), bias (K, V) or (V,), targets (K, N). The outputs are per member: the summed loss over its targets
that are not -100 (a member with none adds 0, not nan), the number of correct argmax predictions, and the
count; the caller divides (a mean per member, or by a global count under torchrun).

Precision: inside an enabled autocast region of x's device the products run in the autocast dtype (as
F.linear would), the log-sum-exp and every accumulation in fp32; gradients come back in the inputs'
dtypes. Plain torch: this is a CPU fast path with a reference, not a Triton kernel.
"""
import torch

IGNORE = -100


def reference(x, weight, bias, targets):
    """The plain path: (loss sums (K,), correct (K,), counts (K,)) from the full logits, for tests."""
    x, weight, bias, targets = _batched(x, weight, bias, targets)
    logits = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # (K, N, V)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                           reduction="none").view(targets.shape)
    valid = targets != IGNORE
    return ce.sum(1), ((logits.argmax(-1) == targets) & valid).sum(1), valid.sum(1)


def linear_cross_entropy(x, weight, bias, targets, chunk: int = 64):
    """(loss sums (K,), correct (K,), counts (K,)); only the loss sums carry a gradient. x (N, H) or
    (K, N, H); weight (V, H) or (K, V, H); bias (V,) or (K, V); targets (N,) or (K, N), -100 = ignored."""
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk={chunk}, must be >= 1")
    shapes = (x.shape, weight.shape, bias.shape, targets.shape)
    bx, bw, bb, bt = _batched(x, weight, bias, targets)
    if bx.size(2) != bw.size(2) or bw.size(1) != bb.size(1) or bt.shape != bx.shape[:2]:
        raise ValueError(f"linear_cross_entropy: shapes x {tuple(shapes[0])}, weight {tuple(shapes[1])}, "
                         f"bias {tuple(shapes[2])}, targets {tuple(shapes[3])} do not fit together")
    loss, correct, count = _LinearCE.apply(x, weight, bias, targets, chunk)
    return loss, correct, count


def _batched(x, weight, bias, targets):
    """Every argument with a leading member axis K (a shared weight or bias broadcast, not copied)."""
    k = x.size(0) if x.dim() == 3 else 1
    x = x if x.dim() == 3 else x.unsqueeze(0)
    targets = targets if targets.dim() == 2 else targets.unsqueeze(0)
    weight = weight if weight.dim() == 3 else weight.unsqueeze(0).expand(k, -1, -1)
    bias = bias if bias.dim() == 2 else bias.unsqueeze(0).expand(k, -1)
    return x, weight, bias, targets


def _compute_dtype(x):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk):
        dtype = _compute_dtype(x)
        want = ctx.needs_input_grad[:3]
        bx, bw, bb, bt = _batched(x, weight, bias, targets)
        bx, bw, bb = bx.to(dtype), bw.to(dtype), bb.float()
        k, n, _ = bx.shape
        loss = torch.zeros(k, dtype=torch.float32, device=x.device)
        correct = torch.zeros(k, dtype=torch.long, device=x.device)
        gx = torch.zeros(bx.shape, dtype=torch.float32, device=x.device) if want[0] else None
        gw = torch.zeros(bw.shape, dtype=torch.float32, device=x.device) if want[1] else None
        gb = torch.zeros(bb.shape, dtype=torch.float32, device=x.device) if want[2] else None
        for s in range(0, n, chunk):
            xc, tc = bx[:, s:s + chunk], bt[:, s:s + chunk]  # (K, c, H), (K, c)
            logits = torch.bmm(xc, bw.transpose(1, 2)).float().add_(bb.unsqueeze(1))  # (K, c, V) fp32
            valid = tc != IGNORE
            safe = tc.clamp(min=0).unsqueeze(-1)
            lse = logits.logsumexp(-1)  # (K, c)
            loss += ((lse - logits.gather(-1, safe).squeeze(-1)) * valid).sum(1)
            correct += ((logits.argmax(-1) == tc) & valid).sum(1)
            if gx is None and gw is None and gb is None:
                continue
            grad = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of the logits
            grad.scatter_add_(-1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
            grad.mul_(valid.unsqueeze(-1))  # d(loss sum)/d(logits); ignored rows give nothing
            if gb is not None:
                gb += grad.sum(1)
            g = grad.to(dtype)
            if gx is not None:
                gx[:, s:s + chunk] = torch.bmm(g, bw).float()
            if gw is not None and dtype == torch.float32:
                gw.baddbmm_(g.transpose(1, 2), xc)  # (K, V, H), accumulated in place
            elif gw is not None:  # CPU matmuls cannot accumulate bf16 products into fp32: one rounding per chunk
                gw += torch.bmm(g.transpose(1, 2), xc)
        count = (bt != IGNORE).sum(1)
        ctx.save_for_backward(gx, gw, gb)
        ctx.shapes = (x.shape, weight.shape, bias.shape)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(correct, count)
        return loss, correct, count

    @staticmethod
    def backward(ctx, g_loss, _g_correct, _g_count):
        gx, gw, gb = ctx.saved_tensors
        scale = g_loss.float().view(-1, 1, 1)  # (K, 1, 1): each member's sum scaled by its own gradient
        out = []
        for g, shape, dtype, sc in zip((gx, gw, gb), ctx.shapes, ctx.dtypes, (scale, scale, scale.squeeze(-1))):
            if g is None:
                out.append(None)
                continue
            g = g * sc
            out.append((g if len(shape) == g.dim() else g.sum(0)).to(dtype))  # a shared weight: members summed
        return out[0], out[1], out[2], None, None
