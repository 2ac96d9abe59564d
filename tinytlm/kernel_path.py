"""Which implementation a model runs: the plain-torch reference or the Triton kernels of kernels/."""
import importlib
import importlib.util

from tinytlm.common import UserError

KERNELS = ("torch", "triton")


def kernel_module(name: str):
    """kernels/<name>.py, imported on first use (Triton is optional): the checkout's top-level `kernels`
    package, or `tinytlm.kernels` where tinytlm is installed (setup.py puts kernels/ there)."""
    try:
        return importlib.import_module(f"kernels.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"tinytlm.kernels.{name}")


def set_kernels(model, name: str):
    """Choose the attention/stem implementation of every layer: "torch" (reference) or "triton"."""
    from tinytlm.model import ConvStem, SelfAttention
    if name not in KERNELS:
        raise UserError(f"unknown kernels {name!r}; valid: {', '.join(KERNELS)}")
    if name == "triton" and importlib.util.find_spec("triton") is None:
        raise UserError("kernels='triton' needs the triton package; use --kernels torch")
    for m in model.modules():
        if isinstance(m, (SelfAttention, ConvStem)):
            m.kernels = name
    return model
