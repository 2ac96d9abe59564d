"""tinytlm/precision.py: the CPU's native bf16 read from what it reports, and the auto rule."""
import pytest
import torch

from tinytlm import precision
from tinytlm.common import UserError

EPYC = "processor\t: 0\nflags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu vme avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE = "flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n"


def test_flags_from_cpuinfo():
    assert precision.cpu_bf16_flags(EPYC) == ["avx512_bf16"]
    assert precision.cpu_bf16_flags(OLD_XEON) == []
    assert precision.cpu_bf16_flags(SAPPHIRE) == ["amx_bf16"]
    assert precision.cpu_bf16_flags(GRAVITON3) == ["bf16"]
    assert precision.cpu_bf16_flags("") == []


@pytest.mark.parametrize("native,expect", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_cpu(monkeypatch, native, expect):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: native)
    assert precision.resolve_precision("auto", torch.device("cpu")) == expect
    assert precision.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_auto_is_bf16_on_cuda(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    assert precision.resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="--precision 'fp16'"):
        precision.resolve_precision("fp16", torch.device("cpu"))


def test_autocast_contexts():
    x = torch.randn(4, 4)
    with precision.autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with precision.autocast(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="resolve it first"):
        precision.autocast(torch.device("cpu"), "auto")
