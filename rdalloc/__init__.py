"""rdalloc — rate-distortion bit allocation for LLM key-value caches."""

from .allocate import Allocation, allocate, default_menu
from .cost import Usage, item_cost, metadata_bits
from .diagnostics import FitReport, Flag, Tolerances, diagnose, fit_report
from .fit import ExponentialFit, ModelChoice, choose_model, fit_exponential, lower_hull, tabulate
from .mismatch import MismatchReport, ModelMismatchWarning, check_quantizer, compare_models
from .models import FULL_BITS, ExponentialModel, TabulatedModel, model_from_dict
from .plan import PLAN_VERSION, Plan
from .waterfill import WaterfillResult, waterfill

__all__ = [
    # models, costs and plans
    "FULL_BITS", "ExponentialModel", "TabulatedModel", "model_from_dict", "Usage", "item_cost", "metadata_bits",
    "Plan", "PLAN_VERSION",
    # solvers
    "WaterfillResult", "waterfill", "allocate", "Allocation", "default_menu",
    # fitting, diagnostics, mismatch
    "fit_exponential", "ExponentialFit", "tabulate", "lower_hull", "choose_model", "ModelChoice", "fit_report",
    "diagnose", "FitReport", "Flag", "Tolerances", "compare_models", "MismatchReport", "check_quantizer",
    "ModelMismatchWarning",
]
__version__ = "0.1.0"
