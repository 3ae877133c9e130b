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

``batches`` has one form: a :class:`Batches` ``(x, y)`` whose leaves carry a
leading ``[num_batches, batch, ...]`` axis (``y`` optional), built from
stacked arrays or, from a list of ``(x, y)`` pairs, by :func:`stack_batches`.
Every estimator scans it inside one jitted call; anything else (a bare
array, a tuple, a list of pairs) is refused with a message naming this form.
:func:`output_gradients` takes the stored samples ``[n, ...]`` themselves.
The layer-structured estimators (:func:`kfac_factors`) choose layers with a
selector over parameter paths (``docs/selectors.md``).
"""

from cl_optax._batches import Batches as Batches
from cl_optax._batches import stack_batches as stack_batches
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
  "Batches",
  "KronFactors",
  "das_normalize",
  "das_param_importance",
  "das_units",
  "fisher_diag",
  "kfac_factors",
  "mas_sensitivity",
  "output_gradients",
  "spg",
  "stack_batches",
]
