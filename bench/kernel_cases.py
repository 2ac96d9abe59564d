"""The project's kernel launches at its real shapes: one list of cases, compiled ahead of time for sm_80 and
sm_90 on a CPU by bench/aot.py and checked against the plain-torch references on a GPU by bench/gpu_kernels.py,
so the GPU compiles exactly the specialisations the CPU check counted.

Shapes: every text is T = 128 tokens, every head D = 64 wide (BertConfig); BERT-6 and BERT-1 have 12 heads,
bert1-h24 24 and the Table 8 member with 8 heads 8; training batches are 32 sequences (the paper's) per member,
benchmark batches 256, stacks K = 5 members (Table 8's committee); a stacked evaluation of K = 22 members at
batch 256 is the largest grid the issue asks to launch (B * heads = 67,584 > 65,535). The dtypes are bf16 (the
GPU's autocast dtype) and fp32. Inputs are laid out as the model hands them over: q, k, v are views of one
qkv projection (padded: (B, T, 3, H, D) transposed to (B, H, T, D); packed: (N, 3, H, D) unbound), the
gradient of the attention output a transposed (B, T, H, D) tensor, the first stem conv reads the embeddings
(K*B, T, W) as (B, K, T, W) through strides.

Families:
- attention      kernels.attention: forward (eval), or forward + backward through the custom op's autograd
                 (train), with / without the key-padding mask, attention dropout 0.1 (BertConfig) or none;
- varlen         kernels.attention_varlen on packed rows (tinytlm/unpad.py's layout: K slabs of N tokens,
                 N = the largest member's real tokens rounded up to 128);
- conv_train     kernels.conv_stem.conv2d_same, every conv of a Table 8 / 9 stem (the first 1 -> d, the middle
                 d -> d, the 1 x 1 projection d -> 1), as ConvStem runs them in training (forward only: the
                 backward is torch's);
- conv_infer     kernels.conv_stem.conv_stem_infer, the fused inference stem (BatchNorm folded);
- dropout_mask   kernels.attention.dropout_mask, the exact keep-mask attention_ref needs (GPU tests only).

`make(case, device, fill)` builds the inputs (fill=False: torch.empty, for the AOT check, whose outputs are
never computed; fill=True: random values), `run(case, inputs)` launches the kernels and returns the outputs
(and gradients), `reference(case, inputs)` computes them with the torch references.
"""
from dataclasses import dataclass

import torch

from tinytlm.model import BertConfig

T, D = 128, 64  # tokens per text (BertConfig.max_pos), head dim (every preset)
ATTN_DROPOUT = 0.1  # BertConfig.attn_dropout
BUCKET = 128  # tinytlm/unpad.py: a member's token budget is its real tokens rounded up to this
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HEADS = {"bert6": 12, "bert1": 12, "bert1-h24": 24, "bert1-cl2-d64-3x3-h8": 8, "tiny": 2}  # tiny: --smoke only
STEMS = ("bert1-cl2-d64-3x3-h8", "bert1-cl2-d64-3x3-h12", "bert1-cl2-d64-16x3-h12", "bert1-cl3-d32-3x3-h12",
         "bert1-cl1-d64-3x3-h12")  # Table 8's stems and Table 9's one-layer member


@dataclass(frozen=True)
class Case:
    family: str  # attention | varlen | conv_train | conv_infer | dropout_mask
    model: str  # the BertConfig preset the shape comes from
    dtype: str  # bf16 | fp32
    phase: str  # train (forward + backward) | eval (forward only)
    members: int = 1  # K stacked members
    batch: int = 32  # sequences per member
    dropout: bool = False  # attention dropout ATTN_DROPOUT (train only)
    mask: bool = True  # attention: a key-padding mask (the model always passes one; None is API-legal)
    head_dim: int = D  # attention, varlen: D (64 in every preset; 16, 32, 128: the kernels' other limits)
    tokens: int = T  # tokens per text (T = 128 everywhere but the --smoke cases, which the interpreter runs)

    @property
    def name(self) -> str:
        extra = "-drop" * self.dropout + "-nomask" * (self.family == "attention" and not self.mask)
        extra += f"-d{self.head_dim}" * (self.head_dim != D) + f"-T{self.tokens}" * (self.tokens != T)
        return f"{self.family}-{self.model}-{self.dtype}-{self.phase}{extra}-K{self.members}-B{self.batch}"


def full_matrix() -> list:
    """Every case of the project's shapes (bench/aot.py --matrix full)."""
    cases = []
    for dtype in DTYPES:
        for model in HEADS:
            for K, B in ((1, 32), (5, 32), (1, 256)):
                for dropout in (False, True):
                    cases += [Case("attention", model, dtype, "train", K, B, dropout, mask)
                              for mask in (True, False)]
                    cases.append(Case("varlen", model, dtype, "train", K, B, dropout))
                cases += [Case("attention", model, dtype, "eval", K, B), Case("varlen", model, dtype, "eval", K, B)]
        cases += [Case("attention", "bert1", dtype, "eval", 22, 256), Case("varlen", "bert1", dtype, "eval", 22, 256)]
        for stem in STEMS:
            for K in (1, 5):
                cases += [Case("conv_train", stem, dtype, "train", K), Case("conv_infer", stem, dtype, "eval", K)]
    # the kernels' other head dims (no preset uses them; tests do): they must compile as cleanly
    limits = [Case(f, "bert6", dtype, "train", 1, 32, True, head_dim=d) for f in ("attention", "varlen")
              for dtype in DTYPES for d in (16, 32, 128)]
    return cases + limits + [Case("dropout_mask", "bert6", "fp32", "train", 1, 32, True)]


def smoke() -> list:
    """A CPU check of the flow (bench/gpu_kernels.py --smoke, under the interpreter): one small case per family."""
    return [Case("attention", "tiny", "bf16", "train", 1, 2, True, tokens=32),
            Case("varlen", "tiny", "bf16", "train", 2, 2, True, tokens=32),
            Case("conv_infer", "tiny-stem", "bf16", "eval", 2, 1, tokens=32),
            Case("conv_train", "tiny-stem", "bf16", "train", 1, 1, tokens=32),
            Case("dropout_mask", "tiny", "fp32", "train", 1, 2, True, tokens=32)]


def smoke_aot() -> list:
    """bench/aot.py --matrix smoke (the SMOKE session): one small forward, one kernel to compile."""
    return [Case("attention", "tiny", "bf16", "eval", 1, 1, tokens=32)]


def config(model: str) -> BertConfig:
    """The model's BertConfig; "tiny-stem" (--smoke) is a one-head tiny model (W = 64) with a one-layer,
    16-channel stem."""
    if model == "tiny-stem":
        return BertConfig.preset("tiny", n_head=1, n_conv=1, conv_channels=16)
    return BertConfig.preset(model)


def sample() -> list:
    """The default CI run's (arch, case) pairs, about a minute of cold compiles on two cores: at sm_90 one of each
    kernel family at the paper's shapes, bf16 with dropout, the fp32 backward that used to spill, and the K = 22
    grid; at sm_80 the bf16 backward with dropout (the worst spiller there)."""
    return [(90, Case("attention", "bert6", "bf16", "train", 1, 32, True)),
            (90, Case("attention", "bert6", "fp32", "train", 1, 32, True)),
            (90, Case("attention", "bert1", "bf16", "eval", 22, 256)),
            (90, Case("varlen", "bert6", "bf16", "train", 5, 32, True)),
            (90, Case("conv_infer", "bert1-cl2-d64-16x3-h12", "bf16", "eval", 5)),
            (80, Case("attention", "bert6", "bf16", "train", 1, 32, True))]


# ----------------------------------------------------------------------------- inputs

def _tensor(shape, dtype, device, fill: bool, gen=None):
    """torch.empty (fill False), else standard normal values drawn on the device from `gen` (a generator there)."""
    if not fill:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=gen, device=device).to(dtype)


def _lengths(rows: int, tokens: int, gen) -> torch.Tensor:
    """(rows,) real tokens per text: about Wikipedia's spread (mean ~90 of 128, scaled to `tokens`), row 0 full,
    at least 2."""
    n = ((torch.rand(rows, generator=gen) * 100 + 28) * tokens / T).long().clamp(2, tokens)
    n[0] = tokens
    return n


def make(case: Case, device, fill: bool, seed: int = 0) -> dict:
    """The inputs of one case on `device`: random values when fill, else uninitialised (the AOT check).
    Lengths come from a CPU generator, values from one on the device (a K = 22 batch has 1.7 G of them)."""
    gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    rows = case.members * case.batch
    if case.family in ("attention", "dropout_mask"):
        H, hd, n = HEADS[case.model], case.head_dim, case.tokens
        qkv = _tensor((rows, n, 3, H, hd), dtype, device, fill, dev_gen)  # the model's fused projection
        lens = _lengths(rows, n, gen)
        mask = (torch.arange(n)[None, :] < lens[:, None]).to(device) if case.mask else None  # (rows, T)
        return {"qkv": qkv, "mask": mask, "H": H, "dout": _tensor((rows, n, H, hd), dtype, device, fill, dev_gen)}
    if case.family == "varlen":
        return _packed(case, device, fill, gen, dev_gen)
    return _stem(case, device, fill, dev_gen)


def _packed(case: Case, device, fill: bool, gen, dev_gen) -> dict:
    """tinytlm/unpad.py's layout: K slabs of N rows, member k's texts back to back, fillers to N."""
    H, K, B = HEADS[case.model], case.members, case.batch
    lens = _lengths(K * B, case.tokens, gen).view(K, B)
    budget = min(-(-int(lens.sum(1).max()) // BUCKET) * BUCKET, B * case.tokens)  # N: the static per-member budget
    starts = torch.cat([torch.zeros(K, 1, dtype=torch.long), lens.cumsum(1)[:, :-1]], 1)
    starts = starts + torch.arange(K)[:, None] * budget  # (K, B): each slab starts at k * N
    qkv = _tensor((K * budget, 3, H, case.head_dim), DTYPES[case.dtype], device, fill, dev_gen)
    as_int = (t.reshape(-1).to(device, torch.int32) for t in (starts, lens))
    return {"qkv": qkv, "seq_start": next(as_int), "seq_len": next(as_int), "H": H,
            "dout": _tensor((K * budget, H, case.head_dim), DTYPES[case.dtype], device, fill, dev_gen)}


def _stem(case: Case, device, fill: bool, dev_gen) -> dict:
    """A stem's input (K*B, T, W) and its layers' parameters, K members stacked (groups = K)."""
    cfg = config(case.model)
    K, W, d, (kh, kw) = case.members, cfg.hidden, cfg.conv_channels, cfg.conv_kernel
    shapes = [(K * d, 1 if i == 0 else d, kh, kw) for i in range(cfg.n_conv)] + [(K, d, 1, 1)]
    params = [{"weight": _tensor(s, torch.float32, device, fill, dev_gen) * (0.3 if fill else 1),
               "bias": _tensor(s[:1], torch.float32, device, fill, dev_gen) * (0.1 if fill else 1)} for s in shapes]
    x = _tensor((K * case.batch, case.tokens, W), DTYPES[case.dtype], device, fill, dev_gen)  # member-major
    return {"x": x, "params": params}


# ----------------------------------------------------------------------------- launches

def run(case: Case, inputs: dict) -> dict:
    """Launch the case's kernels through the public API (custom ops, autograd); returns outputs and grads."""
    if case.family == "attention":
        return _attention(case, inputs)
    if case.family == "varlen":
        return _varlen(case, inputs)
    if case.family == "dropout_mask":
        from kernels.attention import dropout_mask
        rows = inputs["qkv"].shape[0]
        return {"keep": dropout_mask(rows, inputs["H"], case.tokens, 1234, ATTN_DROPOUT, inputs["qkv"].device)}
    if case.family == "conv_infer":
        from kernels.conv_stem import conv_stem_infer
        with torch.no_grad():
            return {"out": conv_stem_infer(inputs["x"], inputs["params"], members=case.members)}
    return _conv_train(case, inputs)


def _attention(case: Case, inputs: dict) -> dict:
    from kernels.attention import attention
    train = case.phase == "train"
    qkv = inputs["qkv"].detach().requires_grad_(train)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (rows, H, T, D), views as in the model
    p = ATTN_DROPOUT if case.dropout else 0.0
    with torch.set_grad_enabled(train):
        out = attention(q, k, v, inputs["mask"], p, seed=inputs.get("seed", 1234) if p else None)
    if not train:
        return {"out": out}
    out.backward(inputs["dout"].transpose(1, 2))  # dO as the model's backward hands it: (rows, H, T, D) view
    return {"out": out, "dqkv": qkv.grad}


def _varlen(case: Case, inputs: dict) -> dict:
    from kernels.attention_varlen import attention_varlen
    train = case.phase == "train"
    qkv = inputs["qkv"].detach().requires_grad_(train)
    q, k, v = qkv.unbind(1)  # 3 x (N, H, D)
    p = ATTN_DROPOUT if case.dropout else 0.0
    with torch.set_grad_enabled(train):
        out = attention_varlen(q, k, v, inputs["seq_start"], inputs["seq_len"], case.tokens, p,
                               seed=inputs.get("seed", 1234) if p else None)
    if not train:
        return {"out": out}
    out.backward(inputs["dout"])
    return {"out": out, "dqkv": qkv.grad}


def _conv_train(case: Case, inputs: dict) -> dict:
    """Every conv of the stem in turn, on inputs laid out as ConvStem's training forward hands them over (its
    BatchNorm and GELU between the convs are torch modules, left out here: each conv reads the previous output,
    a contiguous (B, K*d, T, W) tensor, as it would read GELU(BatchNorm(.)))."""
    from kernels.conv_stem import conv2d_same
    K, x, outs = case.members, inputs["x"], {}
    h = x.view(K, -1, *x.shape[1:]).transpose(0, 1)  # (B, K, T, W) through strides, as ConvStem
    with torch.no_grad():
        for i, p in enumerate(inputs["params"]):
            outs[f"conv{i}"] = h = conv2d_same(h, p["weight"], p["bias"], groups=K)  # (B, K*C_out, T, W)
    return outs


# ----------------------------------------------------------------------------- references (GPU check)

def reference(case: Case, inputs: dict, got: dict) -> dict:
    """What run() should have returned, from the plain-torch references in fp32 (the kernels' exact dropout masks);
    got: run()'s outputs (each conv layer of conv_train is checked on the input the kernel read: its previous
    output)."""
    import torch.nn.functional as F
    from kernels.attention import attention_ref, dropout_mask
    from kernels.attention_varlen import attention_varlen_ref
    from kernels.conv_stem import conv_stem_infer_ref
    p = ATTN_DROPOUT if case.dropout else 0.0
    if case.family == "dropout_mask":
        return {"keep": dropout_mask(inputs["qkv"].shape[0], inputs["H"], case.tokens, 1234, p, inputs["qkv"].device)}
    if case.family in ("attention", "varlen"):
        train = case.phase == "train"
        qkv = inputs["qkv"].detach().float().requires_grad_(train)
        with torch.set_grad_enabled(train):
            if case.family == "attention":
                q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
                out = attention_ref(q, k, v, inputs["mask"], p, seed=1234 if p else None)
                dout = inputs["dout"].float().transpose(1, 2)
            else:
                q, k, v = qkv.unbind(1)
                out = attention_varlen_ref(q, k, v, inputs["seq_start"], inputs["seq_len"], case.tokens, p,
                                           seed=1234 if p else None)
                dout = inputs["dout"].float()
        if not train:
            return {"out": out}
        out.backward(dout)
        return {"out": out, "dqkv": qkv.grad}
    if case.family == "conv_infer":
        return {"out": conv_stem_infer_ref(inputs["x"].float(), inputs["params"], members=case.members)}
    K, x, ref = case.members, inputs["x"], {}
    h = x.view(K, -1, *x.shape[1:]).transpose(0, 1)  # the first layer's input, as _conv_train reads it
    for i, prm in enumerate(inputs["params"]):
        ref[f"conv{i}"] = F.conv2d(h.float(), prm["weight"].to(h.dtype).float(), prm["bias"].to(h.dtype).float(),
                                   padding="same", groups=K)
        h = got[f"conv{i}"]  # the next layer reads what the kernel wrote
    return ref
