"""FactorizedLinear lives in hylorada/nn/factorized.py (a layer primitive, below compress/);
this name is kept for imports written before the move."""
from ..nn.factorized import FactorizedLinear

__all__ = ["FactorizedLinear"]
