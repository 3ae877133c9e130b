r"""Importance masking: SPG soft masks and hard (frozen) masks.

Where to put the mask in a chain matters. SPG (and the official code) masks
the *gradient* before plain SGD, where gradient and update masking coincide.
An adaptive optimiser such as Adam divides each coordinate by its own running
scale, which undoes a per-coordinate factor that stays constant over a task:
in ``chain(soft_mask(), adam(lr))`` the mask acts only while Adam's second
moment still remembers the previous task (about ``1 / (1 - b2)`` steps) and
not at all from a fresh Adam state. Putting the mask *after* the base
optimiser scales the step itself at every step:
``chain(adam(lr), soft_mask())``. With SGD both orders are the same.
"""

from cl_optax._freeze import FreezeState as FreezeState
from cl_optax._freeze import freeze as freeze
from cl_optax._soft_mask import SoftMaskState as SoftMaskState
from cl_optax._soft_mask import soft_mask as soft_mask

__all__ = ["FreezeState", "SoftMaskState", "freeze", "soft_mask"]
