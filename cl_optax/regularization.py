r"""Importance-weighted quadratic penalties as gradient transforms: EWC, online EWC, SI, MAS.

Each method adds the gradient of a quadratic penalty
:math:`\tfrac{\lambda}{2}\sum_i \Omega_i(\theta_i - \theta^*_i)^2` to the
incoming gradient,

.. math::
  g \leftarrow g + \lambda\, \Omega \odot (\theta - \theta^*),

so the loss function stays the task loss and the method lives in the
optimiser: ``optax.chain(cl_optax.ewc(100.0), optax.adam(1e-3))``. Put the
transform *first* in the chain, where its input is the loss gradient (after
an adaptive optimiser the penalty would be added to a step, not a gradient).
``cl_optax.consolidate(opt_state, params, importance=Omega_task)`` ends a task:
it sets the anchor :math:`\theta^*` and merges :math:`\Omega` by the method's
rule. SI and RWalk need no signal: it integrates its importance inside ``update``.

Papers that write the penalty without the 1/2 (MAS, SI) have a :math:`\lambda`
half of ours: ``mas(strength=2 * lambda_paper)``, ``si(strength=2 * c)``.

On a stream without task boundaries, :func:`task_free` wraps any of them and
consolidates inside ``update``, every ``k`` steps or when a trigger fires.
"""

from cl_optax._ewc import EWCState as EWCState
from cl_optax._ewc import OnlineEWCState as OnlineEWCState
from cl_optax._ewc import ewc as ewc
from cl_optax._ewc import online_ewc as online_ewc
from cl_optax._mas import MASState as MASState
from cl_optax._mas import mas as mas
from cl_optax._rwalk import RWalkState as RWalkState
from cl_optax._rwalk import rwalk as rwalk
from cl_optax._si import SIState as SIState
from cl_optax._si import si as si
from cl_optax._task_free import TaskFreeState as TaskFreeState
from cl_optax._task_free import task_free as task_free

__all__ = [
  "EWCState",
  "MASState",
  "OnlineEWCState",
  "RWalkState",
  "SIState",
  "TaskFreeState",
  "ewc",
  "mas",
  "online_ewc",
  "rwalk",
  "si",
  "task_free",
]
