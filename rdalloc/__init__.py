"""rdalloc — rate-distortion bit allocation for LLM key-value caches."""

from .allocate import Allocation, allocate, default_menu
from .cost import Usage, item_cost, metadata_bits
from .diagnostics import FitReport, Flag, Tolerances, diagnose, fit_report
from .fit import ExponentialFit, ModelChoice, choose_model, fit_exponential, lower_hull, tabulate
from .mismatch import MismatchReport, ModelMismatchWarning, check_quantizer, compare_models
from .measure import measure_distortion
from .models import FULL_BITS, ExponentialModel, TabulatedModel, model_from_dict
from .accounting import item_costs, plan_usage, predict_nbytes
from .apply import FakeQuantized, PackedCache, PackedLayer, PackedTensor, PlanApplier
from .bitpack import pack_bits, unpack_bits
from .plan import PLAN_VERSION, Plan
from . import status
from .quantizers import (KIVI, AsymmetricQuantizer, PerTokenAsymmetric, QuaRot, Quantizer, SymmetricAbsmax,
                         available_quantizers, fake_quantize_uniform, get_quantizer, hadamard_transform,
                         register_quantizer)
from .waterfill import WaterfillResult, waterfill

__all__ = [
    # models, costs and plans
    "FULL_BITS", "ExponentialModel", "TabulatedModel", "model_from_dict", "Usage", "item_cost", "metadata_bits",
    "Plan", "PLAN_VERSION",
    # solvers
    "WaterfillResult", "waterfill", "allocate", "Allocation", "default_menu", "status",
    # fitting, diagnostics, mismatch
    "fit_exponential", "ExponentialFit", "tabulate", "lower_hull", "choose_model", "ModelChoice", "fit_report",
    "diagnose", "FitReport", "Flag", "Tolerances", "compare_models", "MismatchReport", "check_quantizer",
    "ModelMismatchWarning",
    # quantizers, measurement, packing and plan application
    "Quantizer", "AsymmetricQuantizer", "KIVI", "QuaRot", "PerTokenAsymmetric", "SymmetricAbsmax", "get_quantizer",
    "register_quantizer", "available_quantizers", "hadamard_transform", "fake_quantize_uniform", "measure_distortion",
    "PlanApplier", "PackedTensor", "PackedLayer", "PackedCache", "FakeQuantized", "pack_bits", "unpack_bits",
    "item_costs", "plan_usage", "predict_nbytes",
]
__version__ = "0.1.0"
