"""Layer primitives at the bottom of the package: FactorizedLinear (nn/factorized.py) and the
dtype cast that keeps RoPE's buffers in float32 (nn/cast.py). Nothing here imports upward."""
from .cast import cast_weights
from .factorized import FactorizedLinear

__all__ = ["FactorizedLinear", "cast_weights"]
