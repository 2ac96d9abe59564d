"""The MLM decoder and its cross-entropy in one op that holds at most `chunk` rows of (N x V) logits at once.

The sparse MLM head ends in a decoder to the 30,522 word ids and a cross-entropy. Done plainly
(`reference` below) the logits of every chosen position, N x V floats, are written, read by log-softmax,
written again as their gradient and read twice more in the backward: at batch 128 on `tiny` that is
~300 MB per pass. Here the rows go through in chunks of at most `chunk` rows, as even as can be (a short
last chunk's products run slowly; wide chunks measured fastest on CPU, bench/mlm_head.py): per chunk one
matrix product makes the biased logits (the bias rides as a last column of the weight, so there is no
broadcast copy and the bias gradient comes out of the weight gradient's product), one fused softmax pass
gives the loss (log-sum-exp = max logit - log of the max probability, which is >= 1/V, so never the log of
an underflow) and, minus the one-hot, the gradient of the logits, which is turned at once into this chunk's
gradients of the hidden states, the decoder weight and its bias (as Liger-Kernel's fused linear
cross-entropy does). The backward then only scales those by the incoming gradient, so the decoder's matrix
products are the same three as the plain path's, without the plain path's N x V log-softmax, its backward,
the zero-filled gradient buffer and the bias passes. The loop's trip count depends on shapes only.

K stacked members (tinytlm/members.py) are one batched call: x (K, N, H), weight (K, V, H) or one shared
(V, H), bias (K, V) or (V,), targets (K, N). The outputs are per member: the summed loss over its targets
that are not -100 (a member with none adds 0, not nan), the number of correct predictions (the target's
logit is the row's largest: argmax == target up to exact ties, which `reference` breaks by index), and the
count; the caller divides (a mean per member, or by a global count under torchrun).

Precision: inside an enabled autocast region of x's device the products run in the autocast dtype (as
F.linear would), the log-sum-exp and every accumulation in fp32; gradients come back in the inputs'
dtypes. Plain torch: this is a CPU fast path with a reference, not a Triton kernel.
"""
import torch

IGNORE = -100
SUB_ROWS = 32  # rows of fp32 probabilities made and used at a time: 32 x 30,522 x 4 B = 3.9 MB, stays in cache


def reference(x, weight, bias, targets):
    """The plain path: (loss sums (K,), correct (K,), counts (K,)) from the full logits, for tests."""
    x, weight, bias, targets = _batched(x, weight, bias, targets)
    logits = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # (K, N, V)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                           reduction="none").view(targets.shape)
    valid = targets != IGNORE
    return ce.sum(1), ((logits.argmax(-1) == targets) & valid).sum(1), valid.sum(1)


def linear_cross_entropy(x, weight, bias, targets, chunk: int = 1024):
    """(loss sums (K,), correct (K,), counts (K,)); only the loss sums carry a gradient. x (N, H) or
    (K, N, H); weight (V, H) or (K, V, H); bias (V,) or (K, V); targets (N,) or (K, N), -100 = ignored."""
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk={chunk}, must be >= 1")
    shapes = (x.shape, weight.shape, bias.shape, targets.shape)
    bx, bw, bb, bt = _batched(x, weight, bias, targets)
    if bx.size(2) != bw.size(2) or bw.size(1) != bb.size(1) or bt.shape != bx.shape[:2]:
        raise ValueError(f"linear_cross_entropy: shapes x {tuple(shapes[0])}, weight {tuple(shapes[1])}, "
                         f"bias {tuple(shapes[2])}, targets {tuple(shapes[3])} do not fit together")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    loss, correct, count = _LinearCE.apply(x, weight, bias, targets, chunk, grad)
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
    def forward(ctx, x, weight, bias, targets, chunk, grad):
        dtype = _compute_dtype(x)
        want = [grad and w for w in ctx.needs_input_grad[:3]]
        bx, bw, bb, bt = _batched(x, weight, bias, targets)
        (k, n, h), v = bx.shape, bw.size(1)
        f32 = dict(dtype=torch.float32, device=x.device)
        gx = torch.empty(k, n, h, **f32) if want[0] else None
        gwa = torch.empty(k, v, h + 1, **f32) if want[1] or want[2] else None  # [d weight, d bias] per member
        shared = weight.dim() == 2 and bias.dim() == 1
        wa = _augment_weight(bw[0], bb[0], dtype) if shared else None  # one (V, H+1) for every member
        loss, correct = torch.zeros(k, **f32), torch.zeros(k, dtype=torch.long, device=x.device)
        for i in range(k):
            loss[i], correct[i] = _member(bx[i], wa if shared else _augment_weight(bw[i], bb[i], dtype), bt[i], chunk,
                                          dtype, None if gx is None else gx[i], None if gwa is None else gwa[i])
        count = (bt != IGNORE).sum(1)
        ctx.save_for_backward(gx, gwa[..., :h] if want[1] else None, gwa[..., h] if want[2] else None)
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
            if len(shape) != g.dim():  # a shared weight or one model: the members summed
                g = g[0] if g.size(0) == 1 else g.sum(0)
            out.append(g.to(dtype))
        return out[0], out[1], out[2], None, None, None


def _augment_weight(w, b, dtype):
    """(V, H+1): the decoder weight with its bias as a last column, so one matrix product makes the biased
    logits and one makes the weight and bias gradients together (no broadcast copy, no separate sum); written
    once, in the compute dtype (under bf16 autocast: one pass over the fp32 weight, no fp32 copy)."""
    wa = torch.empty(w.size(0), w.size(1) + 1, dtype=dtype, device=w.device)
    wa[:, :-1].copy_(w)
    wa[:, -1].copy_(b)
    return wa


def _chunk_rows(n: int, chunk: int) -> int:
    """Rows per chunk: the fewest chunks of at most `chunk` rows, as even as can be (600 rows at chunk 512: two
    of 300, not 512 and a slow 88); at least 1."""
    chunks = max(1, -(-n // chunk))
    return max(1, -(-n // chunks))


def _member(x, wa, t, chunk: int, dtype, gx, gwa):
    """One member, x (N, H), wa (V, H+1), t (N,): (loss sum, correct); with gradients wanted, writes d x into gx
    (N, H) and d wa into gwa (V, H+1) (fp32, as if the loss sum had gradient 1). Per chunk of rows: the
    logits, their max, softmax (one fused pass), the loss from the softmax's max (lse = max logit - log max
    prob: never the log of an underflow), and the softmax minus the one-hot multiplied at once into the
    gradients. Ignored rows: their x rows are zeroed for the weight gradient and their rows of gx zeroed at
    the end, so no pass over the logits masks them."""
    n, h = x.shape
    grad = gx is not None or gwa is not None
    valid = t != IGNORE
    vf = valid.float()
    xa = torch.cat([x, torch.ones_like(x[:, :1])], 1).to(dtype)  # (N, H+1): a 1 multiplies the bias column
    safe = t.clamp(min=0).unsqueeze(1)  # (N, 1): an ignored row reads column 0, then counts nothing
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    xv = xa * vf.unsqueeze(1).to(dtype) if gwa is not None else None  # (N, H+1), ignored rows 0
    size = _chunk_rows(n, chunk)
    minus_one = torch.full((min(size, n), 1), -1.0, device=x.device)
    for s in range(0, n, size):
        e = min(n, s + size)
        logits = torch.mm(xa[s:e], wa.t())  # (c, V), in the compute dtype
        target = logits.gather(1, safe[s:e]).squeeze(1).float()  # (c,)
        top, p_max, g = _softmax_rows(logits, safe[s:e], minus_one, grad)  # (c,), (c,), (c, V) or None
        loss = loss + ((top - p_max.log() - target) * vf[s:e]).sum()  # lse - target logit
        correct = correct + ((target == top) & valid[s:e]).sum()  # argmax == target (up to exact ties)
        if not grad:
            continue
        if gx is not None:
            gx[s:e] = torch.mm(g, wa[:, :h])  # (c, H)
        if gwa is not None:
            _accumulate(gwa, g.t(), xv[s:e], first=s == 0)  # (V, H+1)
    if gwa is not None and n == 0:
        gwa.zero_()  # no rows: no gradient
    if gx is not None:
        gx.mul_(vf.unsqueeze(1))  # ignored rows: no gradient
    return loss, correct


def _softmax_rows(logits, safe, minus_one, grad: bool):
    """A chunk's logits (c, V) -> (max logit (c,), max probability (c,), and with grad the softmax minus the
    one-hot at `safe` (c, 1) in the logits' dtype, else None); fp32 inside. SUB_ROWS rows at a time, so each
    fp32 softmax is read again while it is still in cache (a whole chunk's is up to 125 MB): the same numbers as
    one pass over the chunk; a `tiny` step at batch 32 171 -> 161 ms (docs/kernels-and-speed.md)."""
    c = logits.size(0)
    top, p_max = (torch.empty(c, dtype=torch.float32, device=logits.device) for _ in range(2))
    g = torch.empty_like(logits) if grad else None
    for s in range(0, c, SUB_ROWS):
        e = min(c, s + SUB_ROWS)
        p = torch.softmax(logits[s:e], 1, dtype=torch.float32)  # (r, V), fp32
        top[s:e], p_max[s:e] = logits[s:e].amax(1), p.amax(1)
        if g is not None:
            g[s:e] = p.scatter_add_(1, safe[s:e], minus_one[:e - s])  # softmax - one-hot = d loss / d logits
    return top, p_max, g


def _accumulate(acc, a, b, first: bool):
    """acc (fp32) = a @ b on the first chunk (no zero-filled buffer first), acc += a @ b after; in place where the
    product's dtype is acc's. A bf16 product cannot accumulate into fp32 in a CPU matmul: one rounding per chunk."""
    if first and acc.dtype == a.dtype:
        torch.mm(a, b, out=acc)
    elif first:
        acc.copy_(torch.mm(a, b))
    elif acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc += torch.mm(a, b)
