"""A Triton runtime driver for a GPU that is not there: every launch compiles to a cubin, nothing runs.

Ahead-of-time compile check (bench/aot.py): with `install(arch)` active, the project's own launchers and
custom ops (kernels/) run on CPU tensors exactly as they would on a CUDA device of compute capability
`arch` (80: A100, 90: H100/H200). Triton's JIT specialises each launch from its arguments (dtypes, pointer
alignment, integers equal to 1 or divisible by 16, constexprs), compiles it for GPUTarget("cuda", arch, 32)
down to a cubin with the ptxas shipped in the triton wheel, then hands it to this driver, which records:

- per compiled kernel: name, arch, registers, stack frame, spill stores and loads (parsed from `ptxas -v`,
  which Triton already runs, kept in the kernel's cache metadata so a cache hit still has them), the shared
  memory Triton allocates (metadata "shared", checked by Triton itself against the device's opt-in limit),
  warps, stages, the specialisation, compile seconds;
- per launch: the kernel and its grid, checked against CUDA's limits (x < 2^31, y and z <= 65,535).

Outputs are never computed: the launcher returns at once, so output tensors keep whatever torch.empty left
in them. Nothing needs a GPU, a CUDA driver or libcuda; it runs under triton 3.6 (the GPU image's) and 3.9.
The launchers refuse CPU tensors unless the interpreter is on (kernels/common.py: `on_device`); `install`
lets them through for the duration, which is the one thing it changes in kernels/.
"""
import contextlib
import io
import os
import re
import time

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime import driver as runtime_driver

# cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes: A100 163 KB, H100/H200 227 KB (CUDA programming guide,
# "Compute capabilities" table); Triton compares each kernel's shared memory with this before a launch
SHARED_LIMIT = {80: 166912, 90: 232448}
SM_COUNT = {80: 108, 90: 132}  # A100 SXM, H100/H200 SXM
GRID_LIMIT = (2 ** 31 - 1, 65535, 65535)  # maxGridSize of every GPU since compute capability 3.0

_PTXAS_RE = {
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "registers": r"Used (\d+) registers",
}


def parse_ptxas(log: str) -> dict:
    """The numbers of one kernel's `ptxas -v` log: registers, stack frame and spill bytes (None if absent)."""
    out = {}
    for key, pattern in _PTXAS_RE.items():
        m = re.search(pattern, log)
        out[key] = int(m.group(1)) if m else None
    return out


class Record:
    """What a run compiled and launched: `kernels` keyed by the compiled kernel's hash, `launches` in order."""

    def __init__(self):
        self.kernels = {}
        self.launches = []
        self.case = None  # the case being run: every compile and launch is tagged with it


RECORD = Record()


class _Utils:
    """The part of the CUDA driver's utils Triton calls on the way to a launch."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_LIMIT[self.arch], "multiprocessor_count": SM_COUNT[self.arch],
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads per block): handles are placeholders, the
        # numbers come from ptxas (the launcher reads them from the metadata)
        return 1, 1, 0, 0, 1024

    def unload_module(self, module):
        pass


class _Launcher:
    """Built by Triton once per compiled kernel (with its metadata); called for every launch."""

    def __init__(self, src, metadata):
        self.name = metadata.name
        self.hash = metadata.hash

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
        grid = (grid_x, grid_y, grid_z)
        bad = [f"grid[{i}] = {g} > {lim}" for i, (g, lim) in enumerate(zip(grid, GRID_LIMIT)) if g > lim]
        RECORD.launches.append({"kernel": self.name, "hash": self.hash, "grid": grid, "case": RECORD.case,
                                "error": "; ".join(bad) or None})


class AotDriver(DriverBase):
    """Triton's active driver for a CUDA device of compute capability `arch` that is not there."""

    def __init__(self, arch: int):
        super().__init__()
        self.arch = arch
        self.utils = _Utils(arch)
        self.launcher_cls = _Launcher

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the AOT driver runs nothing: no benchmarks")

    def get_current_device(self):
        return self.arch  # one device per arch: Triton keys its kernel caches (and shared-memory limit) by it

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)


def _make_cubin(original):
    """CUDABackend.make_cubin, with ptxas's -v log (which Triton prints when TRITON_DUMP_PTXAS_LOG=1)
    parsed into the kernel's metadata, so it is saved in Triton's cache with the cubin."""
    def make_cubin(self, src, metadata, *args, **kwargs):
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            cubin = original(self, src, metadata, *args, **kwargs)
        metadata["aot_ptxas"] = {**parse_ptxas(buf.getvalue()), "ptxas_s": round(time.perf_counter() - t0, 2)}
        return cubin
    make_cubin.aot_original = original
    return make_cubin


def _listener(*, src, metadata, metadata_group, times, cache_hit):
    """Triton's compilation listener: one entry per compiled (or cache-loaded) kernel."""
    seconds = (times.ir_initialization + sum(t for _, t in times.lowering_stages) + times.store_results) / 1e6
    key = metadata["hash"]
    ptxas = metadata.get("aot_ptxas") or {}
    entry = RECORD.kernels.setdefault(key, {
        "kernel": metadata["name"], "arch": metadata["target"]["arch"] if isinstance(metadata["target"], dict)
        else metadata["target"].arch, "shared": metadata["shared"], "num_warps": metadata["num_warps"],
        "num_stages": metadata["num_stages"], "registers": ptxas.get("registers"), "stack": ptxas.get("stack"),
        "spill_stores": ptxas.get("spill_stores"), "spill_loads": ptxas.get("spill_loads"),
        "compile_s": round(seconds, 2), "cache_hit": cache_hit, "case": RECORD.case,
        "signature": _signature(src)})
    entry.setdefault("cases", []).append(RECORD.case)


def _signature(src) -> str:
    """The specialisation in words: argument types and constexprs (the part of Triton's key that matters)."""
    raw = getattr(src, "constexprs", None) or getattr(src, "constants", None) or {}
    consts = {k if isinstance(k, str) else src.fn.arg_names[k[0]]: v for k, v in raw.items()}
    sig = getattr(src, "signature", {})
    return ", ".join(f"{k}={v}" for k, v in sorted(consts.items()) if not k.startswith("stride")) + \
        " | " + ", ".join(f"{k}:{v}" for k, v in sig.items() if v != "constexpr")


@contextlib.contextmanager
def install(arch: int):
    """Make a fake CUDA device of compute capability `arch` Triton's active driver, and let kernels/'s
    launchers accept CPU tensors, for the duration."""
    from kernels import common
    if arch not in SHARED_LIMIT:
        raise ValueError(f"arch {arch}: one of {sorted(SHARED_LIMIT)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the AOT check compiles: run it with TRITON_INTERPRET unset")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    # Triton's DriverConfig: `_active` is what set_active sets; restored as it was (reset_active would look
    # for a real driver, which a CPU machine does not have)
    saved = (CUDABackend.make_cubin, knobs.compilation.listener, common.on_device, runtime_driver._active)
    CUDABackend.make_cubin = _make_cubin(CUDABackend.make_cubin)
    knobs.compilation.listener = _listener
    common.on_device = lambda t: True
    runtime_driver.set_active(AotDriver(arch))
    try:
        yield RECORD
    finally:
        CUDABackend.make_cubin, knobs.compilation.listener, common.on_device, runtime_driver._active = saved
