"""Probe the device: what it is, what runs on it, and its measured bf16 matrix rate (the MFU denominator).

    PYTHONPATH=. python bench/probe.py --out gpu_out/bench      # on a GPU: probe.json + probe.md (< 20 s)
    PYTHONPATH=. python bench/probe.py --smoke                   # CPU check: fp32 512^3, prints only

Writes <out>/probe.json and <out>/probe.md (without --out: bench/results/<date>-<device>-probe.{json,md};
a smoke run only prints unless --out is given). probe.json:

    {"date": "2026-05-01T12:00:00Z" (UTC), "git", "smoke": bool,
     "device": "NVIDIA H100 80GB HBM3", "device_type": "cuda" | "cpu",
     "driver": "570.86.15" (nvidia-smi) or null, "cuda": "12.8" (torch.version.cuda) or null,
     "capability": "9.0" or null, "sm_count": 132 or null, "memory_gib": 79.2 or null,
     "versions": {"python", "torch", "triton", "transformers"},
     "matmul": {"n": 8192, "dtype": "bfloat16", "warmup": 20, "iters": 10, "repeats": 3,
                "best_ms": per matmul, "tflops": 2 n^3 / best_ms, "label": what the number is},
     "matmul_tflops": the same tflops: bench/train_throughput.py --probe reads it as the MFU peak}

The rate: on CUDA torch.matmul of two random (never zero: zeros run faster) n x n bf16 matrices,
--warmup calls, then --repeats times --iters calls between two torch.cuda.synchronize; the best repeat
counts, 2 n^3 FLOPs per call. On CPU, or with --smoke, fp32 512^3 instead, labelled as a CPU number:
it says nothing about a GPU.
"""
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


import torch

from bench.common import device_label, markdown_table, result_path, run_header, sync, utc_now, \
    versions, write_report
from tinytlm.common import ArgParser, UserError, cli, git_revision, write_json
from tinytlm.train import add_dataclass_args, dataclass_from_args, resolve_device


# -----------------------------------------------------------------------------
# config

@dataclass
class ProbeConfig:
    n: int = 8192  # matrix size on CUDA (n x n x n); CPU and --smoke use 512
    warmup: int = 20  # untimed matmuls (~30 ms on an H100: clocks up, cuBLAS handle and kernel choice made)
    iters: int = 10  # matmuls per timed repeat
    repeats: int = 3  # timed repeats; the best counts
    device: str = "auto"  # auto | cuda | cpu
    smoke: bool = False  # fp32 512^3 on any device: proves the code runs, not a performance number
    out: str = ""  # folder for probe.json and probe.md (default bench/results/, none with --smoke)


def parse_config(argv=None) -> ProbeConfig:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, ProbeConfig)
    pc = dataclass_from_args(ProbeConfig, ap.parse_args(argv))
    if pc.n < 1 or pc.warmup < 0 or pc.iters < 1 or pc.repeats < 1:
        raise UserError("need n >= 1, warmup >= 0, iters >= 1, repeats >= 1")
    return pc


# -----------------------------------------------------------------------------
# device facts

def driver_version():
    """The NVIDIA driver from nvidia-smi, or None where there is no nvidia-smi (or it fails)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def device_facts(device) -> dict:
    facts = {"device": device_label(device), "device_type": device.type, "driver": driver_version(),
             "cuda": torch.version.cuda, "capability": None, "sm_count": None, "memory_gib": None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        facts.update(capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                     memory_gib=round(p.total_memory / 2 ** 30, 1))
    return facts


# -----------------------------------------------------------------------------
# matrix rate

def matmul_rate(device, n: int, dtype, warmup: int, iters: int, repeats: int) -> dict:
    """Best-of-repeats rate of torch.matmul on random n x n matrices: 2 n^3 FLOPs per call."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / iters)
    if not torch.isfinite(c).all():  # a broken library or card must not hand out a peak
        raise RuntimeError("matmul produced non-finite values")
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "warmup": warmup, "iters": iters, "repeats": repeats,
            "best_ms": float(f"{best * 1e3:.4g}"), "tflops": float(f"{2 * n ** 3 / best / 1e12:.4g}")}


# -----------------------------------------------------------------------------
# main

def probe(pc: ProbeConfig, device) -> dict:
    gpu = device.type == "cuda" and not pc.smoke
    n, dtype = (pc.n, torch.bfloat16) if gpu else (512, torch.float32)
    mm = matmul_rate(device, n, dtype, pc.warmup, pc.iters, pc.repeats)
    mm["label"] = (f"bf16 {n}^3 torch.matmul on {device_label(device)}: the MFU peak" if gpu else
                   f"CPU-sized fp32 {n}^3 on {device.type}: a smoke number, NOT a GPU rate")
    return {"date": utc_now(), "git": git_revision(), "smoke": pc.smoke, **device_facts(device),
            "versions": versions(), "matmul": mm, "matmul_tflops": mm["tflops"]}


def main(argv=None):
    t0 = time.perf_counter()
    pc = parse_config(argv)
    device = resolve_device(pc.device)
    result = probe(pc, device)
    md_path = result_path("probe", device, str(Path(pc.out) / "probe.md") if pc.out else "", pc.smoke)
    rows = [{"field": k, "value": v} for k, v in result.items() if k not in ("versions", "matmul")]
    rows += [{"field": f"matmul.{k}", "value": v} for k, v in result["matmul"].items()]
    header = run_header(device, asdict(pc))
    if pc.smoke:
        header.insert(0, "- **SMOKE RUN: fp32 512^3; not a performance number**")
    table = markdown_table(["field", "value"], rows)
    print("\n".join(header) + "\n\n" + table)
    print(f"matmul: {result['matmul']['tflops']} TFLOP/s ({result['matmul']['label']}); "
          f"probe took {time.perf_counter() - t0:.1f} s")
    if md_path is not None:
        write_json(md_path.with_suffix(".json"), result)
        write_report(md_path, "Device probe" + (" (smoke run)" if pc.smoke else ""), header, [table])
        print(f"wrote {md_path.with_suffix('.json')} and {md_path}")
    return result


if __name__ == "__main__":
    cli(main)
