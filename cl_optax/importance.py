r"""Estimators: pure functions that compute a transform's ``consolidate`` signal.

Each takes a model or loss function, the parameters at the end of a task and
the task's data, runs jitted, and returns a pytree in the form the matching
state stores:

* :func:`spg` (``importance=`` of :func:`cl_optax.soft_mask`),
  :func:`das_units` with :func:`das_param_importance` / :func:`das_normalize`
  (DAS unit and head importance for :func:`cl_optax.soft_mask`);
* :func:`fisher_diag` (``importance=`` of :func:`cl_optax.ewc` /
  :func:`cl_optax.online_ewc`, diagonal ``precision=`` of :func:`cl_optax.ncl`)
  and :func:`kfac_factors` (Kronecker ``precision=`` of :func:`cl_optax.ncl`);
* :func:`mas_sensitivity` (``importance=`` of :func:`cl_optax.mas`);
* :func:`output_gradients` (``output_grads=`` of :func:`cl_optax.ogd`).

``batches`` is either a stacked pair ``(xs, ys)`` whose arrays carry a
leading number-of-batches axis (scanned inside one jitted call), or any
iterable of ``(x, y)`` pairs (one jitted call per batch, summed on device).
:func:`output_gradients` takes the stored samples ``[n, ...]`` themselves.
"""

from cl_optax._das_importance import das_normalize as das_normalize
from cl_optax._das_importance import das_param_importance as das_param_importance
from cl_optax._das_importance import das_units as das_units
from cl_optax._fisher import KronFactors as KronFactors
from cl_optax._fisher import fisher_diag as fisher_diag
from cl_optax._fisher import kfac_factors as kfac_factors
from cl_optax._mas_sensitivity import mas_sensitivity as mas_sensitivity
from cl_optax._output_gradients import output_gradients as output_gradients
from cl_optax._spg import spg as spg

__all__ = [
  "KronFactors",
  "das_normalize",
  "das_param_importance",
  "das_units",
  "fisher_diag",
  "kfac_factors",
  "mas_sensitivity",
  "output_gradients",
  "spg",
]
