"""tinytlm/cpu_memory.py: on glibc, malloc accepts the settings (in a child process: they last for its life)."""
import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keep_freed_memory_on_glibc():
    code = ("import torch; from tinytlm.cpu_memory import keep_freed_memory as k; assert k() is True; "
            "a = torch.ones(50_000_000); del a; b = torch.zeros(50_000_000); assert float(b.sum()) == 0")
    subprocess.run([sys.executable, "-c", code], check=True)
