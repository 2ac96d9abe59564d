"""Helpers shared by the bench/ scripts: synthetic token batches, model FLOPs from a BertConfig,
timing with device synchronisation, the MFU peak from bench/probe.py's probe.json, result files.

Nothing here runs work at import. Timings synchronise the device around the timed region
(CUDA kernels are asynchronous); on CPU `sync` is a no-op.
"""
import dataclasses
import datetime
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from tinytlm.common import UserError, atomic_path, git_revision, read_json
from tinytlm.model import BertConfig
from tinytlm import precision

CLS, SEP, PAD, MASK = 101, 102, 0, 103  # bert-base-uncased special ids, as train_mlm.py
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


# -----------------------------------------------------------------------------
# data and configs

def autocast(device):
    """The benches' fixed precision (the one their committed results were measured in): bf16 autocast on
    CUDA, fp32 on CPU, whatever this CPU could do (the training commands' --precision is tinytlm/precision.py)."""
    return precision.autocast(device, "bf16" if device.type == "cuda" else "fp32")


def token_batch(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) int64 ids on the CPU: [CLS] ids in [1000, 30000) ... [SEP], every 4th row padded.

    Rows 3, 7, 11, ... get a random length in [T/4, T): [SEP] at length-1 and [PAD] after,
    so the key-padding mask is exercised; the other rows are full (T tokens).
    """
    ids = torch.randint(1000, 30000, (B, T), generator=gen)  # (B, T)
    lengths = torch.full((B,), T)
    padded = torch.arange(B) % 4 == 3
    lengths[padded] = torch.randint(max(2, T // 4), T, (int(padded.sum()),), generator=gen)
    pos = torch.arange(T)[None, :]  # (1, T)
    ids[:, 0] = CLS
    ids[pos == (lengths[:, None] - 1)] = SEP
    ids[pos >= lengths[:, None]] = PAD
    return ids


def smoke_config(cfg: BertConfig) -> BertConfig:
    """The same architecture shrunk for a CPU smoke run: <= 2 blocks, 2 heads, <= 8 stem channels."""
    return dataclasses.replace(cfg, n_layer=min(cfg.n_layer, 2), n_head=2, conv_channels=min(cfg.conv_channels, 8))


# -----------------------------------------------------------------------------
# FLOPs

def matmul_params(cfg: BertConfig) -> int:
    """Weights of the encoder's matmuls: per block qkv 3H^2 + out-proj H^2 + MLP 2 * ffn_mult * H^2."""
    return cfg.n_layer * (4 + 2 * cfg.ffn_mult) * cfg.hidden ** 2


def stem_flops(cfg: BertConfig, T: int) -> int:
    """Forward FLOPs of the conv stem for one sequence: 2 * kh * kw * c_in * c_out * T * H per conv,
    'same' padding so every conv has T x H outputs; the final 1x1 conv (d -> 1) counts as one more."""
    if cfg.n_conv == 0:
        return 0
    kh, kw = cfg.conv_kernel
    d = cfg.conv_channels
    convs = [(kh, kw, 1 if i == 0 else d, d) for i in range(cfg.n_conv)] + [(1, 1, d, 1)]
    return sum(2 * a * b * c_in * c_out * T * cfg.hidden for a, b, c_in, c_out in convs)


def train_flops(cfg: BertConfig, B: int, T: int, n_masked: int) -> int:
    """Model FLOPs of one MLM training step (forward + backward = 3 x forward), the useful work:

        trunk      6 * matmul_params * B * T                (every position, padding included)
        attention  12 * n_layer * T^2 * H * B              (Q K^T and P V: 2 * 2 T^2 H forward, x3)
        MLM head   6 * (H^2 + H * V) * n_masked             (dense + tied decoder, masked tokens only)
        conv stem  3 * stem_flops(cfg, T) * B               (see stem_flops)

    Embedding lookups, LayerNorm, GELU, softmax and the optimizer step are not counted. The same
    count is used for every stack, so a stack that does more (HF's dense head over all B*T
    positions) shows a lower MFU: MFU here is useful model FLOPs per second over the peak.
    """
    H, V = cfg.hidden, cfg.vocab_size
    trunk = 6 * matmul_params(cfg) * B * T
    attention = 12 * cfg.n_layer * T * T * H * B
    head = 6 * (H * H + H * V) * n_masked
    return trunk + attention + head + 3 * stem_flops(cfg, T) * B


def check_matmul_params(model) -> None:
    """The formula's matmul weight count must equal the encoder's Linear weights (fails if the model changes)."""
    counted = sum(m.weight.numel() for m in model.bert.encoder.modules() if isinstance(m, torch.nn.Linear))
    assert counted == matmul_params(model.config), f"matmul_params {matmul_params(model.config)} != model {counted}"


# -----------------------------------------------------------------------------
# timing

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_step_ms(step, warmup: int, steps: int, device):
    """Call step(i) warmup times, then `steps` times under one timer.
    Returns (first call s, all warmup calls s, mean ms of the timed calls).

    The first call is timed on its own: for a compiled model it is the compile time. The warmup total
    also holds any recompile (torch.compile's dynamic=None compiles again, dynamic, when a shape first
    changes: the Bernoulli-masked sparse head), so warmup s - warmup * mean is the whole compile cost.
    """
    sync(device)
    t0 = time.perf_counter()
    step(0)
    sync(device)
    first_s = time.perf_counter() - t0
    for i in range(1, warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(device)
    return first_s, warmup_s, (time.perf_counter() - t0) * 1e3 / steps


def latency_ms(fn, warmup: int, n: int, device):
    """Each call timed alone, synchronised before and after. Returns (median ms, p90 ms)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def timed_ms(fn, device) -> float:
    """Wall time of one call, synchronised before and after (CUDA kernels are asynchronous)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def rotations(names: list, n: int):
    """n rounds of names, each round every name once, the first one rotating: the order interleaved_times calls
    its fns in (and bench/cpu.py its worker processes), so a load that comes and goes falls on every path alike."""
    for i in range(n):
        yield names[i % len(names):] + names[:i % len(names)]


def interleaved_times(fns: dict, n: int, device) -> dict:
    """Every call's ms of each fn over n rounds (rotations: every fn once a round, the order rotating)."""
    times = {k: [] for k in fns}
    for names in rotations(list(fns), n):
        for name in names:
            times[name].append(timed_ms(fns[name], device))
    return times


def interleaved_ms(fns: dict, n: int, device) -> dict:
    """Median ms per call of each fn over n interleaved rounds (interleaved_times)."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, n, device).items()}


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def error_note(e: Exception) -> str:
    """One table-safe line for a failed case: 'FAILED: <type>: <message, 160 chars at most>'."""
    return f"FAILED: {type(e).__name__}: " + " ".join(str(e).split())[:160].replace("|", "/")


def read_peak(probe: str, default: float):
    """(peak TFLOP/s for MFU, where it came from): probe.json's matmul_tflops (bench/probe.py), else
    `default`. An unusable probe only warns: a failed probe must not stop a GPU session's benchmark."""
    if not probe:
        return default, "--peak_tflops"
    try:
        info = read_json(probe, "probe")
        peak = float(info["matmul_tflops"])
        if not peak > 0:
            raise ValueError(f"matmul_tflops {peak}")
        return peak, f"{probe}: {info.get('matmul', {}).get('label', '')}"
    except (UserError, KeyError, TypeError, ValueError) as e:
        print(f"warning: --probe {probe} unusable ({e}); MFU uses --peak_tflops {default:g}", file=sys.stderr)
        return default, f"--peak_tflops (probe {probe} unusable)"


def free_memory(device) -> None:
    """Between cases: drop cached blocks and restart the peak-memory counter."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def import_transformers():
    """transformers, with its Hub-kernels integration off: where the Hub's `kernels` package is installed,
    transformers imports it when a model module loads, and from the repository root finds this checkout's
    kernels/ first, which lacks the Hub's names (ImportError: cannot import name 'CUDAProperties'). Nothing
    here uses Hub kernels."""
    import transformers
    import transformers.utils as tu
    from transformers.utils import import_utils
    import_utils.is_kernels_available = tu.is_kernels_available = lambda *a, **k: False
    return transformers


# -----------------------------------------------------------------------------
# result files

def device_label(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def utc_now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


def result_path(kind: str, device, out: str, smoke: bool):
    """--out if given; else bench/results/<date>-<device-slug>-<kind>.md; a smoke run writes nothing by default."""
    if out:
        return Path(out)
    if smoke:
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return RESULTS / f"{datetime.date.today().isoformat()}-{device_slug(name)}-{kind}.md"


def device_slug(name: str) -> str:
    """A device name as a file-name part: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "unknown"


def markdown_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def run_header(device, config: dict) -> list:
    """Lines for the top of a report (and the console): command, git, versions, device, config."""
    v = versions()
    return [f"- command: `PYTHONPATH=. python {' '.join(shlex.quote(a) for a in sys.argv)}`",
            f"- date: {utc_now()}; git revision: `{git_revision()}`",
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"- device: {device_label(device)}",
            "- config: " + " ".join(f"{k}={val}" for k, val in config.items())]


def write_report(path, title: str, header: list, sections: list) -> None:
    """Atomically (re)write a markdown report; called after every row so a killed run keeps what it had."""
    if path is None:
        return
    text = f"# {title}\n\n" + "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
