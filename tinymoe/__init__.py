"""tinymoe: DeepSeek-style MLA, DeepSeekMoE, multi-token prediction and GRPO in NumPy.

Every forward has a hand-written backward beside it; numba only where a loop is hot.
Importing this package does no work: no numba compilation, no file or network access.
"""
from tinymoe.config import ModelConfig
from tinymoe.gradcheck import gradcheck, gradcheck_scalar
from tinymoe.model import Model

__version__ = "0.1.0"
__all__ = ["Model", "ModelConfig", "gradcheck", "gradcheck_scalar", "__version__"]
