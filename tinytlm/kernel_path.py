"""Which implementation a model runs: the plain-torch reference or the Triton kernels of kernels/."""
import importlib
import importlib.util

from tinytlm.common import UserError

KERNELS = ("torch", "triton")


_MODULES = {}  # name -> module, filled by set_kernels before any forward runs


def kernel_module(name: str):
    """kernels/<name>.py, imported on first use (Triton is optional): the checkout's top-level `kernels`
    package, or `tinytlm.kernels` where tinytlm is installed (setup.py puts kernels/ there). Inside a
    torch.compile'd forward this is a dict lookup (torch.compile will not trace importlib), which is
    why set_kernels imports the modules first."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(f"kernels.{name}")
        except ModuleNotFoundError:
            _MODULES[name] = importlib.import_module(f"tinytlm.kernels.{name}")
    return _MODULES[name]


def set_kernels(model, name: str):
    """Choose the attention/stem implementation of every layer: "torch" (reference) or "triton"."""
    from tinytlm.model import ConvStem, SelfAttention
    if name not in KERNELS:
        raise UserError(f"unknown kernels {name!r}; valid: {', '.join(KERNELS)}")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise UserError("kernels='triton' needs the triton package; use --kernels torch")
        for module in ("attention", "attention_varlen", "conv_stem"):
            kernel_module(module)
    for m in model.modules():
        if isinstance(m, (SelfAttention, ConvStem)):
            m.kernels = name
    return model
