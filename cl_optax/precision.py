r"""Precision-preconditioned trust-region steps: natural continual learning (NCL).

NCL (Kao, Jensen, van de Ven, Bernacchia, Hennequin, NeurIPS 2021) keeps a
Laplace posterior :math:`\mathcal N(\mu, \Lambda^{-1})` over the tasks seen so
far and, on the next task, takes natural-gradient-like steps in the metric of
the prior precision :math:`\Lambda`: the current task's gradient is
preconditioned by :math:`(\Lambda + \alpha^2 I)^{-1}` and the parameters are
pulled back to the prior mean :math:`\mu`. Directions the old tasks are sure
about (large precision) barely move; uncertain directions move freely.

``ncl`` is a gradient transformation: put it *before* a plain step,
``optax.chain(cl_optax.ncl(data_size=N), optax.sgd(lr, momentum=0.9))`` (the
official code uses SGD with momentum; Adam's diagonal rescaling would undo the
preconditioning). At a task boundary,
``cl_optax.consolidate(opt_state, params, precision=F)`` with ``F`` from
:func:`cl_optax.importance.fisher_diag` (diagonal) or
:func:`cl_optax.importance.kfac_factors` (Kronecker-factored).
"""

from cl_optax._kron import NCLKron as NCLKron
from cl_optax._ncl import NCLState as NCLState
from cl_optax._ncl import ncl as ncl

__all__ = ["NCLKron", "NCLState", "ncl"]
