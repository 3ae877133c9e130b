r"""Adapters: LoRA branches with fixed-capacity slots, O-LoRA and InfLoRA.

The model side is a pytree convention plus pure functions (no Flax here):
a *branch* is any node holding ``lora_a [d_in, r]``, ``lora_b [r, d_out]``,
``lora_slots_a [S, d_in, r]`` and ``lora_slots_b [S, r, d_out]`` (Flax's
``[in, out]`` orientation, as ``nnx.LoRA``'s ``lora_a`` / ``lora_b``), whose
output :math:`s\,(x A B + \sum_k x A_k B_k)` (:func:`lora_apply`) is added to a
frozen base layer's. Slots of future tasks are zero, so shapes never change.

* :func:`lora_init`, :func:`lora_apply`, :func:`lora_write_slot`,
  :func:`lora_branches`, :func:`input_covariance` (the layer inputs InfLoRA
  captures), :func:`kaiming_a`;
* :func:`olora_orthogonality`, :func:`adapter_norm`: O-LoRA's loss terms;
* :func:`olora`, :func:`inflora`: the transforms (wrappers over the adapter's
  optimiser) whose boundary writes store each task's adapter in its slot.

See ``docs/adapters.md``.
"""

from cl_optax._inflora import InfLoRAState as InfLoRAState
from cl_optax._inflora import inflora as inflora
from cl_optax._lora import adapter_norm as adapter_norm
from cl_optax._lora import input_covariance as input_covariance
from cl_optax._lora import kaiming_a as kaiming_a
from cl_optax._lora import lora_apply as lora_apply
from cl_optax._lora import lora_branches as lora_branches
from cl_optax._lora import lora_init as lora_init
from cl_optax._lora import lora_write_slot as lora_write_slot
from cl_optax._lora import olora_orthogonality as olora_orthogonality
from cl_optax._olora import OLoRAState as OLoRAState
from cl_optax._olora import olora as olora

__all__ = [
  "adapter_norm",
  "inflora",
  "InfLoRAState",
  "input_covariance",
  "kaiming_a",
  "lora_apply",
  "lora_branches",
  "lora_init",
  "lora_write_slot",
  "olora",
  "olora_orthogonality",
  "OLoRAState",
]
