"""rdalloc — rate-distortion bit allocation for LLM key-value caches."""

from .allocate import Allocation, allocate, default_menu
from .cost import Usage, item_cost, metadata_bits
from .models import FULL_BITS, ExponentialModel, TabulatedModel, model_from_dict
from .plan import PLAN_VERSION, Plan
from .waterfill import WaterfillResult, waterfill

__all__ = ["FULL_BITS", "ExponentialModel", "TabulatedModel", "model_from_dict", "Usage", "item_cost",
           "metadata_bits", "Plan", "PLAN_VERSION", "WaterfillResult", "waterfill", "allocate", "Allocation",
           "default_menu"]
__version__ = "0.1.0"
