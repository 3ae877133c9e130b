"""cl_optax: continual-learning methods as composable Optax transformations."""

from cl_optax import importance as importance
from cl_optax import metrics as metrics
from cl_optax import streams as streams
from cl_optax._state import ContinualState as ContinualState
from cl_optax._state import consolidate as consolidate
from cl_optax.masking import FreezeState as FreezeState
from cl_optax.masking import SoftMaskState as SoftMaskState
from cl_optax.masking import freeze as freeze
from cl_optax.masking import soft_mask as soft_mask

__version__ = "0.1.0"

__all__ = [
  "ContinualState",
  "FreezeState",
  "SoftMaskState",
  "consolidate",
  "freeze",
  "importance",
  "metrics",
  "soft_mask",
  "streams",
]
