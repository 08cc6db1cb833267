"""elr-ext: kernel-accelerated ops and modules for ELR-Diffusion (efficient low-rank controllable
text-to-image diffusion).

    import elr_ext
    out = elr_ext.fdn(z, gamma, beta, num_groups=32, activation="silu")
    y = elr_ext.kron_lora_linear(x, A, U, V, weight, bias, scale)   # Kronecker LoRA, dW never built
    q, k, v = elr_ext.lowrank_proj(x, [Bq, Bk, Bv], [Aq, Ak, Av])    # W_j = A_j B_j, one GEMM for the B_j
    elr_ext.build_info()           # what was compiled, and why anything is missing
    with elr_ext.use_backend("torch"):
        ...                        # force the pure-PyTorch reference
"""

from . import backends, reference
from .backends import available_backends, build_info, use_backend
from .ops import fdn, kron_delta, kron_lora_conv2d, kron_lora_linear, lowrank_proj

backends._load_native()  # one clear warning now if a compiled part is missing, not at first use

from . import nn  # noqa: E402  (modules build on the ops above)
from .decompose import decompose, load_decomposed, save_decomposed  # noqa: E402
from . import tiny  # noqa: E402  (the tiny built-in model configuration; imports diffusers lazily)

__version__ = "0.1.0"
__all__ = ["fdn", "kron_lora_linear", "kron_lora_conv2d", "kron_delta", "lowrank_proj", "build_info", "use_backend", "available_backends", "backends", "reference", "nn", "tiny", "decompose",
           "save_decomposed", "load_decomposed"]


def __getattr__(name):
    # elr_ext.pipelines builds on diffusers (the "train" extra): imported on first use.
    if name == "pipelines":
        import importlib

        return importlib.import_module(".pipelines", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
