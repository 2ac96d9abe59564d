"""The conv stem of the paper's BERT-1 variants (Table 8): conv layers between the embeddings and the
encoder, on the (B, T, H) embedding output seen as a one-channel (T x H) image."""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinytlm.kernel_path import Impl


class ConvStem(nn.Module):
    """Conv layers of the paper's BERT-1 variants, on the embedding output seen as a 1-channel image.

    n_conv x [Conv2d(c_in -> d, kernel, 'same') + BatchNorm2d + GELU], c_in = 1 for the first,
    then Conv2d(d -> 1, 1x1) + BatchNorm2d + GELU back to one channel. Shape (B, T, H) is kept.
    As in the reference code, padded positions are not masked: the kernel sees their embeddings,
    so outputs near the end of a text depend on how much padding follows (texts are always 128).
    K members: grouped convolutions (groups = K), member k's image is input channel k and its
    channels are the k-th group of every layer; BatchNorm is per channel, hence per member.
    impl.kernels "triton": the convs are kernels/conv_stem.py's; pure inference folds BN into the convs (one
    fused op); with autograd on (training, or gradients in eval mode) only the convs are kernels and BN runs
    as a module (batch statistics in train mode, running statistics in eval mode).
    """

    def __init__(self, cfg, members=1, impl=Impl()):  # cfg: tinytlm.model.BertConfig
        super().__init__()
        d, k, K = cfg.conv_channels, cfg.conv_kernel, members
        self.convs = nn.ModuleList(nn.Conv2d(K * (1 if i == 0 else d), K * d, k, padding="same", groups=K)
                                   for i in range(cfg.n_conv))
        self.bns = nn.ModuleList(nn.BatchNorm2d(K * d) for _ in range(cfg.n_conv))
        self.proj = nn.Conv2d(K * d, K, 1, groups=K)
        self.proj_bn = nn.BatchNorm2d(K)
        self.members = K
        ks = impl.conv_stem_kernels()  # kernels/conv_stem.py, or None for the torch reference
        # conv(x, weight, bias, groups): what nn.Conv2d(padding="same") calls, or the Triton forward (torch backward)
        self.conv = ks.conv2d_same if ks else functools.partial(F.conv2d, padding="same")
        self.infer = ks.conv_stem_infer if ks else None  # the fused BN-folded inference op, Triton only

    def forward(self, x):
        # x (K*B, T, H)
        K = self.members
        if self.infer is not None and not self.training and not torch.is_grad_enabled():
            return self.infer(x, self.fold(), members=K)
        conv = functools.partial(self.conv, groups=K)
        h = x.view(K, -1, *x.shape[1:]).transpose(0, 1)  # (B, K, T, H); K = 1: x.unsqueeze(1)
        for c, bn in zip(self.convs, self.bns):
            h = F.gelu(bn(conv(h, c.weight, c.bias)))  # (B, K*d, T, H)
        h = F.gelu(self.proj_bn(conv(h, self.proj.weight, self.proj.bias)))  # (B, K, T, H)
        return h.transpose(0, 1).reshape(x.shape)  # (K*B, T, H)

    @torch.no_grad()
    def fold(self) -> list:
        """Eval-mode parameters for the fused inference op: one {"weight": (C_out, C_in, kh, kw), "bias":
        (C_out,)} per conv layer with its BatchNorm (running statistics) folded in, then the 1x1 projection's
        (K members: C_out = K*d and K, C_in per group)."""
        return [dict(zip(("weight", "bias"), fold_bn(c.weight, c.bias, bn.running_mean, bn.running_var, bn.weight,
                                                     bn.bias, bn.eps)))
                for c, bn in [*zip(self.convs, self.bns), (self.proj, self.proj_bn)]]


def fold_bn(conv_w, conv_b, bn_mean, bn_var, bn_w, bn_b, eps):
    """Fold an eval-mode BatchNorm into the preceding conv: returns (weight, bias) with
    conv'(x) = bn(conv(x)). conv_b may be None; bn_w / bn_b may be None (affine=False)."""
    scale = torch.rsqrt(bn_var.float() + eps) * (bn_w.float() if bn_w is not None else 1.0)
    bias = ((conv_b.float() if conv_b is not None else 0.0) - bn_mean.float()) * scale
    bias = bias + (bn_b.float() if bn_b is not None else 0.0)
    return (conv_w.float() * scale[:, None, None, None]).to(conv_w.dtype), bias.to(conv_w.dtype)
