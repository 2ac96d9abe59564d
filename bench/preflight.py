"""The GPU session's preflight: can this Python run the session? One line either way, in seconds.

    python3 bench/preflight.py --cuda      # the GPU session (bench/gpu_session.sh runs it under `timeout 30`)
    python3 bench/preflight.py             # SMOKE: the same imports, no CUDA needed

Imports torch, triton, pytest and transformers (what every later stage needs) and, with --cuda, asks torch
for a CUDA device. Prints "preflight ok: python V, torch V (CUDA V), triton V, transformers V, pytest V, device D"
and exits 0, or prints "preflight: ..." naming what is missing and exits 1. It uses nothing of the project
(not even tinytlm), so a broken checkout shows up in the stages, not here.
"""
import importlib
import sys

NEEDED = ("torch", "triton", "pytest", "transformers")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cuda = "--cuda" in argv
    mods, missing = {}, []
    for name in NEEDED:
        try:
            mods[name] = importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken install raising anything at import
            missing.append(f"{name} ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
    if missing:
        print(f"preflight: cannot import {'; '.join(missing)} with {sys.executable}")
        return 1
    torch = mods["torch"]
    if cuda and not torch.cuda.is_available():
        print(f"preflight: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
        return 1
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"preflight ok: python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          + ", ".join(f"{n} {getattr(mods[n], '__version__', '?')}" for n in NEEDED[1:]) + f", device {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
