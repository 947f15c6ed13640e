"""rdalloc — rate-distortion bit allocation for LLM key-value caches.

The entry points a user needs are here; everything else is reachable by module (``rdalloc.quantizers.KIVI``,
``rdalloc.apply.PackedCache``, ``rdalloc.cost.item_cost``, ...).
"""

from .accounting import predict_nbytes
from .allocate import Allocation, allocate
from .apply import PlanApplier
from .diagnostics import fit_report
from .fit import choose_model, fit_exponential
from .measure import measure_distortion
from .mismatch import ModelMismatchWarning, check_quantizer, compare_models
from .models import ExponentialModel, TabulatedModel
from .plan import Plan
from .quantizers import Quantizer, available_quantizers, get_quantizer, register_quantizer
from .waterfill import WaterfillResult, waterfill

__all__ = [
    # distortion models and the two solvers
    "ExponentialModel", "TabulatedModel", "waterfill", "WaterfillResult", "allocate", "Allocation",
    # fitting a model to measured distortion, its diagnostics, and the cost of using the wrong one
    "fit_exponential", "choose_model", "fit_report", "compare_models", "check_quantizer", "ModelMismatchWarning",
    # quantizers and measuring their distortion
    "Quantizer", "get_quantizer", "register_quantizer", "available_quantizers", "measure_distortion",
    # plans, applying them to KV tensors, and the bytes they hold
    "Plan", "PlanApplier", "predict_nbytes",
]
__version__ = "0.1.0"
