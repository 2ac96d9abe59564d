"""Which floating-point precision a run computes in: `--precision auto | fp32 | bf16`.

bf16 means autocast to bfloat16 around the forward passes; master weights, optimizer state and
checkpoints stay fp32 in every precision. `auto` is bf16 on CUDA and on CPUs that multiply bf16 natively
(x86 with avx512_bf16 or AMX, Arm with the BF16 extension), fp32 elsewhere: a CPU without native bf16
emulates it and runs slower than fp32. Native support is read from what the CPU reports
(/proc/cpuinfo's flags on Linux, sysctl on macOS), never guessed from the model name.
"""
import contextlib
import platform
import subprocess
from pathlib import Path

import torch

from tinytlm.common import UserError

PRECISIONS = ("auto", "fp32", "bf16")
HELP = "bf16 autocast around the forwards, or fp32; auto: bf16 on CUDA and CPUs with native bf16"  # --precision
_X86_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str) -> list:
    """The flags of a /proc/cpuinfo text that mean native bf16 products (x86: avx512_bf16, amx_bf16;
    Arm: bf16 in `Features`), in the order found; [] when there are none."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words = value.split()
            return [w for w in words if w in _X86_FLAGS or w == "bf16"]
    return []


def native_bf16_cpu() -> bool:
    """Whether this machine's CPU multiplies bf16 natively, from what the CPU reports."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        return bool(cpu_bf16_flags(info.read_text(errors="replace")))
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.stdout.strip() == "1"
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """"fp32" or "bf16" for --precision name on device (auto: bf16 on CUDA and native-bf16 CPUs)."""
    if name not in PRECISIONS:
        raise UserError(f"--precision {name!r}: choose {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu()):
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The context every forward of a run goes through: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"autocast: precision {precision!r}, expected fp32 or bf16 (resolve it first)")
    return contextlib.nullcontext()
