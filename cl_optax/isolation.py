r"""Parameter isolation: each task gets its own part of the network.

- :func:`hat` (HAT, Serra et al. 2018): unit gates learned per task; the
  updates of weights between units earlier tasks use are masked by
  :math:`1 - \min(A_{in}, A_{out})`. Model side: :func:`hat_gate`,
  :func:`hat_anneal`; loss: :func:`cl_optax.losses.hat_regularizer`.
- :func:`packnet` (PackNet, Mallya & Lazebnik 2018): an integer owner map per
  kernel; prune at the boundary (an exact-zero write) and freeze.
  Inference: :func:`packnet_params`; prune rule :func:`packnet_share`.
- WSN (Kang et al. 2022): the top-c straight-through mask :func:`wsn_mask`
  over learnable scores, the past tasks' masks frozen with
  :func:`cl_optax.freeze`, the per-task masks kept in :class:`WSNMasks`.

All three need the task identity at test time (task-incremental learning)
and are placed after the optimiser in a chain.
"""

from cl_optax._hat import HATState as HATState
from cl_optax._hat import hat as hat
from cl_optax._hat import hat_anneal as hat_anneal
from cl_optax._hat import hat_gate as hat_gate
from cl_optax._packnet import PackNetState as PackNetState
from cl_optax._packnet import packnet as packnet
from cl_optax._packnet import packnet_params as packnet_params
from cl_optax._packnet import packnet_share as packnet_share
from cl_optax._wsn import WSNMasks as WSNMasks
from cl_optax._wsn import wsn_kth as wsn_kth
from cl_optax._wsn import wsn_mask as wsn_mask

__all__ = [
  "HATState",
  "PackNetState",
  "WSNMasks",
  "hat",
  "hat_anneal",
  "hat_gate",
  "packnet",
  "packnet_params",
  "packnet_share",
  "wsn_kth",
  "wsn_mask",
]
