r"""Importance estimators: pure functions ``(fn, params, batches) -> pytree``.

``batches`` is either a stacked pair ``(xs, ys)`` whose arrays carry a
leading number-of-batches axis (scanned inside one jitted call), or any
iterable of ``(x, y)`` pairs (one jitted call per batch, summed on device).
"""

from cl_optax._das_importance import das_normalize as das_normalize
from cl_optax._das_importance import das_param_importance as das_param_importance
from cl_optax._das_importance import das_units as das_units
from cl_optax._fisher import KronFactors as KronFactors
from cl_optax._fisher import fisher_diag as fisher_diag
from cl_optax._fisher import kfac_factors as kfac_factors
from cl_optax._mas_importance import mas as mas
from cl_optax._output_gradients import output_gradients as output_gradients
from cl_optax._spg import spg as spg

__all__ = [
  "KronFactors",
  "das_normalize",
  "das_param_importance",
  "das_units",
  "fisher_diag",
  "kfac_factors",
  "mas",
  "output_gradients",
  "spg",
]
