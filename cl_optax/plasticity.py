r"""Plasticity: methods that keep a network able to learn on long non-stationary streams.

The other side of the stability-plasticity dilemma: instead of protecting
old tasks, they undo what makes a network stop learning (dead or saturated
units, growing weights, lost rank).

- :func:`l2_init`: a pull towards the initial parameters,
  :math:`g + 2\lambda(\theta - \theta_0)`; before the optimiser.
- :func:`shrink_perturb`: at a task boundary,
  :math:`\theta \leftarrow \lambda\theta + \sigma\theta_{\text{fresh}}`
  (a boundary write, with an optional optimiser restart); last in the chain.
- :func:`param_noise`: Gaussian noise on every parameter at every step
  (with weight decay before the optimiser: Dohare et al.'s continual
  shrink and perturb); after the learning rate.
- :func:`continual_backprop` (selector :func:`cbp_selector`) and :func:`redo`:
  per-step re-draws of low-utility or dormant hidden units, wrappers over
  the whole optimiser built on :func:`cl_optax.unit_resets`; last.

- :func:`adam_gnt` (:func:`scale_by_adam_gnt`): Adam with a per-element
  step count, the ``inner`` optimiser under which a reset unit restarts
  Adam's bias correction exactly (continual backprop's ``AdamGnT``).

None of them reads a boundary signal except :func:`shrink_perturb`
(``fresh=``).
"""

from cl_optax._adam_gnt import AdamGnTState as AdamGnTState
from cl_optax._adam_gnt import adam_gnt as adam_gnt
from cl_optax._adam_gnt import scale_by_adam_gnt as scale_by_adam_gnt
from cl_optax._continual_backprop import CBPStats as CBPStats
from cl_optax._continual_backprop import cbp_selector as cbp_selector
from cl_optax._continual_backprop import continual_backprop as continual_backprop
from cl_optax._continual_backprop import redo as redo
from cl_optax._l2_init import L2InitState as L2InitState
from cl_optax._l2_init import l2_init as l2_init
from cl_optax._shrink_perturb import ParamNoiseState as ParamNoiseState
from cl_optax._shrink_perturb import ShrinkPerturbState as ShrinkPerturbState
from cl_optax._shrink_perturb import param_noise as param_noise
from cl_optax._shrink_perturb import shrink_perturb as shrink_perturb

__all__ = [
  "AdamGnTState",
  "CBPStats",
  "adam_gnt",
  "L2InitState",
  "ParamNoiseState",
  "ShrinkPerturbState",
  "cbp_selector",
  "continual_backprop",
  "l2_init",
  "param_noise",
  "redo",
  "scale_by_adam_gnt",
  "shrink_perturb",
]
