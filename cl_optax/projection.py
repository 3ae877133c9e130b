r"""Gradient projection: A-GEM, GEM, OGD and GPM.

Each method changes the gradient so that a step does not (to first order)
increase the loss of earlier tasks:

* :func:`agem` and :func:`gem` read per-step memory gradients as extra args
  (``ref_grads=`` / ``task_grads=`` and ``task_mask=``) and keep
  :math:`\langle \tilde g, g_{mem} \rangle \ge 0`. Their memory lives outside the
  optimiser, in :mod:`cl_optax.replay`; the reference gradients are computed in
  the same jitted step (see ``examples/flax_agem.py`` and ``examples/flax_gem.py``).
* :func:`nscl` (Adam-NSCL) sits *after* the base optimiser and maps each
  kernel's update onto the null space of its old inputs' covariance.
* :func:`trgp` projects as GPM and keeps each task's subspace, for the
  scaled-weight layer :func:`trgp_scaled_kernel` over the trust region that
  :func:`trgp_trust_region` selects (:func:`trgp_view`).
* :func:`ogd` and :func:`gpm` keep orthonormal bases in their state, grown at
  :func:`cl_optax.consolidate` (``output_grads=`` from
  :func:`cl_optax.importance.output_gradients` / ``representations=``), and
  remove the gradient's component in their span. :func:`conv_representations`
  builds a convolution's representations for :func:`gpm` (its input patches in
  the kernel's feature order).

All four keep fixed shapes (GEM: a fixed ``max_tasks`` leading axis and a
validity mask; OGD/GPM: fixed-capacity buffers with a count), so nothing
retraces across tasks. Dot products are global over the whole pytree and run
in float32 whatever the gradient dtype. Non-finite gradients pass through
unchanged. The guarantees hold for plain SGD on the projected gradient; put the
projection *before* the base optimiser (``chain(agem(), sgd(lr))``).

:func:`solve_box_qp` is GEM's in-``jit`` QP solver, public for users who solve
the same dual (or check GEM's) themselves.
"""

from cl_optax._agem import AGEMState as AGEMState
from cl_optax._agem import agem as agem
from cl_optax._conv import ConvRepresentations as ConvRepresentations
from cl_optax._conv import conv_representations as conv_representations
from cl_optax._gem import GEMState as GEMState
from cl_optax._gem import gem as gem
from cl_optax._gpm import GPMState as GPMState
from cl_optax._gpm import gpm as gpm
from cl_optax._nscl import NSCLState as NSCLState
from cl_optax._nscl import nscl as nscl
from cl_optax._nscl import nscl_batch_means as nscl_batch_means
from cl_optax._nscl import null_space_projector as null_space_projector
from cl_optax._ogd import OGDState as OGDState
from cl_optax._ogd import ogd as ogd
from cl_optax._qp import solve_box_qp as solve_box_qp
from cl_optax._sgp import SGPState as SGPState
from cl_optax._sgp import sgp as sgp
from cl_optax._trgp import TRGPState as TRGPState
from cl_optax._trgp import trgp as trgp
from cl_optax._trgp import trgp_view as trgp_view
from cl_optax._trgp_parts import TRGPView as TRGPView
from cl_optax._trgp_parts import trgp_scaled_kernel as trgp_scaled_kernel
from cl_optax._trgp_parts import trgp_trust_region as trgp_trust_region

__all__ = [
  "AGEMState",
  "ConvRepresentations",
  "GEMState",
  "GPMState",
  "NSCLState",
  "OGDState",
  "SGPState",
  "TRGPState",
  "TRGPView",
  "agem",
  "conv_representations",
  "gem",
  "gpm",
  "nscl",
  "nscl_batch_means",
  "null_space_projector",
  "ogd",
  "sgp",
  "solve_box_qp",
  "trgp",
  "trgp_scaled_kernel",
  "trgp_trust_region",
  "trgp_view",
]
