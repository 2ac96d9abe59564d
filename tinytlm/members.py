"""Stacked members: K independent models of one shape, trained and evaluated as one model.

A stacked model holds every weight with a leading member dimension and runs all K members in one
kernel launch per layer; activations fold the members into the batch, member-major:
rows k*B ... k*B + B - 1 of a (K*B, T, H) tensor belong to member k. Only the layers with weights
need to know K, so tinytlm/model.py reads as plain BERT:

    layer          one model (K = 1, plain torch modules)   K members
    Linear         weight (out, in), bias (out,)            (K, out, in), (K, out): one baddbmm
    LayerNorm      weight, bias (H,)                        (K, H): normalise, then per-member affine
    Embedding      weight (V, H)                            (K, V, H): one lookup in a (K*V, H) table
    conv stem      Conv2d(c_in, d), BatchNorm2d(d)          Conv2d(K*c_in, K*d, groups=K), BatchNorm2d(K*d)
    attention, dropout, GELU                                unchanged (the members are batch rows)

K = 1 is the plain model: the same modules, shapes, state_dict keys and code path as before stacking
existed. A member's weights, optimizer state and checkpoint are exactly a single model's
(`member_state`, `member_optimizer_state`), and K single models stack into one (`load_members`,
`stack_optimizer_states`), so a member trained in a stack can be resumed, fine-tuned or evaluated on
its own. Nothing couples the members: AdamW is elementwise, the loss is the sum of the members' mean
losses (each member's gradient is its own loss's), and gradient clipping is per member
(`clip_grad_norm_members`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# layers with an optional member dimension

def linear(x, weight, bias=None):
    """F.linear, or K of them at once: weight (K, out, in), bias (K, out), x (K*N, ..., in) member-major."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    K, n_out, n_in = weight.shape
    xk = x.reshape(K, -1, n_in)  # (K, N, in)
    if bias is None:
        y = torch.bmm(xk, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.unsqueeze(1), xk, weight.transpose(1, 2))  # (K, N, out)
    return y.view(*x.shape[:-1], n_out)


class Linear(nn.Linear):
    """nn.Linear; with members > 1, K of them (weight (K, out, in), bias (K, out))."""

    def __init__(self, in_features, out_features, members=1):
        super().__init__(in_features, out_features)
        if members > 1:  # values come from the members' own inits (load_members)
            self.weight = nn.Parameter(self.weight.new_empty(members, out_features, in_features))
            self.bias = nn.Parameter(self.bias.new_zeros(members, out_features))

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dimension; with members > 1, a per-member affine (K, H)."""

    def __init__(self, hidden, eps, members=1):
        super().__init__(hidden, eps=eps)
        if members > 1:
            self.weight = nn.Parameter(self.weight.new_ones(members, hidden))
            self.bias = nn.Parameter(self.bias.new_zeros(members, hidden))

    def forward(self, x):
        if self.weight.dim() == 1:
            return super().forward(x)
        K, H = self.weight.shape
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps).view(K, -1, H)  # (K, N, H)
        return torch.addcmul(self.bias.unsqueeze(1), y, self.weight.unsqueeze(1)).view(x.shape)


class Embedding(nn.Embedding):
    """nn.Embedding; with members > 1, K tables (K, V, H) looked up as one (K*V, H) table.
    idx (K*B, ...) member-major; padding_idx rows get no gradient in every member, as in nn.Embedding."""

    def __init__(self, num_embeddings, dim, padding_idx=None, members=1):
        super().__init__(num_embeddings, dim, padding_idx=padding_idx)
        if members > 1:
            self.weight = nn.Parameter(self.weight.new_empty(members, num_embeddings, dim))

    def forward(self, idx):
        if self.weight.dim() == 2:
            return super().forward(idx)
        K, V, H = self.weight.shape
        offset = torch.arange(K, device=idx.device).unsqueeze(1) * V  # (K, 1): member k's rows start at k*V
        e = F.embedding((idx.reshape(K, -1) + offset).view(idx.shape), self.weight.view(K * V, H))
        if self.padding_idx is not None:  # the value of the padding row, but no gradient into it
            e = torch.where((idx == self.padding_idx).unsqueeze(-1), e.detach(), e)
        return e


def member_counts(logits, targets, members: int):
    """(K, 3) per member, from logits (K*N, V) and targets (K*N,) member-major: the cross-entropy summed over
    its targets != -100 (0, not nan, for a member without any: a torchrun share, a held-out batch), its
    correct argmax predictions and its count of targets. Only the loss sums carry a gradient; the caller
    divides (each member's mean, or by a global count under torchrun). The plain path (tinytlm/kernel_path.py)."""
    ce = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none").view(members, -1)
    valid = (targets != -100).view(members, -1)
    correct = ((logits.detach().argmax(-1).view(members, -1) == targets.view(members, -1)) & valid).sum(1)
    return torch.stack([ce.sum(1), correct.float(), valid.sum(1).float()], 1)


def member_means(counts, members: int):
    """The members' mean losses from member_counts: (K,), or a scalar for one model (as F.cross_entropy's
    mean: nan where a member has no target)."""
    loss = counts[:, 0] / counts[:, 2]
    return loss if members > 1 else loss.squeeze(0)


def clip_grad_norm_members(params, max_norm: float, members: int):
    """clip_grad_norm_ per member: each member's gradient norm over its own slices, clipped alone."""
    grads = [p.grad for p in params if p.grad is not None]
    if members == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = torch.stack([g.reshape(members, -1).float().norm(dim=1) for g in grads]).norm(dim=0)  # (K,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_
    for g in grads:
        g.view(members, -1).mul_(coef.to(g.dtype).unsqueeze(1))
    return norms


# -----------------------------------------------------------------------------
# K single models <-> one stacked model

def _single_shapes(model) -> dict:
    with torch.device("meta"):  # no memory, no init cost
        one = model.with_members(1)
    return {k: v.shape for k, v in one.state_dict().items()}


def _stack(tensors: list, shape):
    """K single tensors into the stacked one of `shape`; a scalar (BatchNorm's num_batches_tracked,
    AdamW's step: the members step together) is shared and must agree."""
    if tensors[0].dim() == 0:
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise ValueError(f"members disagree on a shared counter: {[t.item() for t in tensors]}")
        return tensors[0].clone()
    return torch.stack(tensors).reshape(shape)


def _unstack(t, members: int, k: int, shape):
    return t.clone() if t.dim() == 0 else t.reshape(members, -1)[k].reshape(shape).clone()


def stack_models(models: list):
    """One stacked model of K single models of one shape (member order); one model is returned as it is."""
    if len(models) == 1:
        return models[0]
    with torch.device("meta"):  # the weights come from the members: no init, no extra copy
        stacked = models[0].with_members(len(models))
    return load_members(stacked, [m.state_dict() for m in models], assign=True)


def load_members(model, states: list, assign=False):
    """Load K single-model state_dicts (member order) into stacked `model` (members = K)."""
    K = model.members
    if len(states) != K:
        raise ValueError(f"{len(states)} member states for a stack of {K}")
    target, shapes = model.state_dict(), _single_shapes(model)
    for i, s in enumerate(states):  # each member must be a single model of this shape
        bad = sorted(set(s) ^ set(shapes)) or [k for k in shapes if s[k].shape != shapes[k]]
        if bad:
            raise ValueError(f"member {i} is not a model of the stack's shape (at {bad[0]})")
    stacked = {k: _stack([s[k] for s in states], target[k].shape) for k in target}
    model.load_state_dict(stacked, assign=assign)
    return model


def member_state(model, k: int) -> dict:
    """Member k's state_dict, exactly a single model's (keys, shapes)."""
    shapes = _single_shapes(model)
    return {name: _unstack(t, model.members, k, shapes[name]) for name, t in model.state_dict().items()}


def _param_shapes(model) -> list:
    shapes = _single_shapes(model)
    return [shapes[name] for name, _ in model.named_parameters()]


def member_optimizer_state(model, opt_state: dict, k: int) -> dict:
    """Member k's part of the stacked model's AdamW state_dict: the state_dict a single model's
    AdamW would have (parameters indexed in the same order, model.parameters())."""
    shapes = _param_shapes(model)
    state = {i: {name: _unstack(t, model.members, k, shapes[i]) if torch.is_tensor(t) else t
                 for name, t in s.items()}
             for i, s in opt_state["state"].items()}
    return {"state": state, "param_groups": [dict(g) for g in opt_state["param_groups"]]}


def stack_optimizer_states(model, opt_states: list) -> dict:
    """K single models' AdamW state_dicts (member order) -> the stacked model's."""
    shapes = [p.shape for p in model.parameters()]
    ref = opt_states[0]
    if any(set(o["state"]) != set(ref["state"]) for o in opt_states):
        raise ValueError("members' optimizer states cover different parameters")
    state = {i: {name: _stack([o["state"][i][name] for o in opt_states], shapes[i]) if torch.is_tensor(t) else t
                 for name, t in s.items()}
             for i, s in ref["state"].items()}
    return {"state": state, "param_groups": [dict(g) for g in ref["param_groups"]]}
