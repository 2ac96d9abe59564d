"""A non-editable install: one top-level package, commands that run from any directory, and data, runs and
results under the current directory (or $TINYTLM_HOME), never inside site-packages."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_installed_layout(tmp_path):
    src = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "data", "runs", "gpu_*", "results", "bench",
                                                             "tests", "*.egg-info", "build", "__pycache__"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in site.iterdir()) == ["tinytlm", "tinytlm-0.1.0.dist-info"]
    assert (site / "tinytlm" / "kernels" / "attention_kernels.py").is_file()

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYTLM_")}
    env.update(PYTHONPATH=str(site), TRITON_INTERPRET="1")
    probe = ("import torch, tinytlm\n"
             "from tinytlm.common import default_data_root, git_revision\n"
             "from tinytlm.kernel_path import Impl, kernel_module\n"
             "from tinytlm.model import BertConfig, BertForMLM\n"
             "m = BertForMLM(BertConfig.preset('tiny', n_layer=1, n_head=1, head_dim=16), impl=Impl('triton'))\n"
             "logits, _ = m(torch.randint(1000, 2000, (2, 8)))\n"
             "print(tinytlm.__file__, default_data_root().resolve(), kernel_module('attention').__name__,\n"
             "      tuple(logits.shape), git_revision(), sep='\\n')\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    package, data, kernels, shape, rev = r.stdout.split("\n")[:5]
    assert Path(package).is_relative_to(site)
    assert Path(data) == (work / "data").resolve()  # the current directory, not site-packages
    assert kernels == "tinytlm.kernels.attention" and shape == "(2, 8, 30522)"
    assert rev == "unknown"  # neither the package's folder nor the current one is a git checkout
    home = tmp_path / "home"
    r = subprocess.run([sys.executable, "-c", "from tinytlm.common import default_data_root as d; print(d())"],
                       cwd=work, env={**env, "TINYTLM_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert Path(r.stdout.strip()) == home / "data"
    for module in ("pretrain", "finetune", "ensemble", "tasks", "wikipedia", "tokstats", "paper", "demo"):
        r = subprocess.run([sys.executable, "-m", f"tinytlm.{module}", "--help"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith("usage:"), (module, r.stderr[-1000:])
    assert sorted(p.name for p in work.iterdir()) == []  # nothing written by --help
