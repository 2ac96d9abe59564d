"""Benchmark: fused Triton attention (kernels/attention.py) vs torch SDPA, forward and
forward + backward, BERT shapes, on CUDA.

    python bench/attention.py                       # B=32 H=12 T=128 D=64 bf16
    python bench/attention.py --T 512 --dropout 0.1

Times come from triton.testing.do_bench (median ms); tokens/s = B * T / time. Each row is run
without and with a key-padding mask (a quarter of the keys padded), since SDPA leaves its flash
kernel for a slower one once a mask is given. Writes a markdown table with the command and git
revision to bench/results/<date>-<device>-attention.md. Without CUDA it says so and exits 0:
interpreter timings on CPU say nothing about performance.
"""
import argparse
import datetime
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tinytlm.common import git_revision

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- config

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=32, help="batch size")
    p.add_argument("--H", type=int, default=12, help="heads")
    p.add_argument("--T", type=int, default=128, help="sequence length")
    p.add_argument("--D", type=int, default=64, help="head dim")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout probability (both paths)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- bench

def bench_case(fn_fwd, q, k, v, grad):
    """(fwd ms, fwd+bwd ms) of fn_fwd(q, k, v) -> out."""
    from triton.testing import do_bench

    def fwd_bwd():
        out = fn_fwd(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    with torch.no_grad():
        ms_fwd = do_bench(lambda: fn_fwd(q, k, v))
    return ms_fwd, do_bench(fwd_bwd)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("bench/attention.py: needs a CUDA GPU with TRITON_INTERPRET unset; "
              "interpreter timings are not performance numbers. Nothing measured.")
        return 0
    from kernels.attention import attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    B, H, T, D, p = args.B, args.H, args.T, args.D, args.dropout
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    pad = torch.ones(B, T, dtype=torch.bool, device="cuda")
    pad[:, T - T // 4:] = False  # last quarter of every sequence is padding

    rows = []
    for mask in (None, pad):
        sdpa_mask = None if mask is None else mask[:, None, None, :]
        cases = {
            "triton": lambda q, k, v, m=mask: attention(q, k, v, key_padding_mask=m, dropout_p=p),
            "sdpa": lambda q, k, v, m=sdpa_mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p),
        }
        for name, fn in cases.items():
            ms_fwd, ms_fb = bench_case(fn, q, k, v, grad)
            rows.append((name, "yes" if mask is not None else "no", ms_fwd, B * T / ms_fwd * 1e3,
                         ms_fb, B * T / ms_fb * 1e3))

    # --------------------------------------------------------------------------- report
    device = torch.cuda.get_device_name()
    cmd = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    lines = [
        f"# attention: B={B} H={H} T={T} D={D} {args.dtype} dropout={p}",
        "",
        f"- command: `{cmd}`",
        f"- git revision: {git_revision()}",
        f"- device: {device}; torch {torch.__version__}; triton {__import__('triton').__version__}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        "| impl | padding mask | fwd ms | fwd tokens/s | fwd+bwd ms | fwd+bwd tokens/s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {n} | {m} | {a:.3f} | {b:,.0f} | {c:.3f} | {d:,.0f} |" for n, m, a, b, c, d in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = args.out / f"{datetime.date.today().isoformat()}-{slug}-attention.md"
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
