"""Natural continual learning (NCL): diagonal or Kronecker-factored precision, plain SGD."""

import optax

import cl_optax
from benchmarks.continual.methods.regularization import fisher
from benchmarks.continual.model import mlp_layer_names
from benchmarks.continual.registry import Method, TaskEnd, register


def _consolidate_ncl(e: TaskEnd):
  return cl_optax.consolidate(e.opt_state, e.params, precision=fisher(e)), e.aux


def _consolidate_ncl_kfac(e: TaskEnd):
  factors = cl_optax.importance.kfac_factors(
    e.heads.tapped[e.task],
    e.params,
    e.first_batches(e.hp.get("fisher_n")),
    layers=mlp_layer_names(len(e.params)),
    fisher=e.hp["fisher"],
    key=e.key,
  )
  return cl_optax.consolidate(e.opt_state, e.params, precision=factors), e.aux


# data_size N: the examples per task (official: 12000 split MNIST, 60000 permuted MNIST)
_DEFAULTS = {"data_size": 300.0, "strength": 1.0, "damping": 1e-3, "fisher": "exact",
             "fisher_n": 1000}  # fmt: skip

register(
  Method(
    "ncl",
    lambda h: optax.chain(
      cl_optax.ncl(h.hp["data_size"], strength=h.hp["strength"], damping=h.hp["damping"]),
      optax.sgd(h.lr),
    ),
    "NCL (Kao et al. 2021), diagonal precision from importance.fisher_diag; plain SGD",
    "sgd",
    end_task=_consolidate_ncl,
    defaults=_DEFAULTS,
  )
)
register(
  Method(
    "ncl_kfac",
    lambda h: optax.chain(
      cl_optax.ncl(
        h.hp["data_size"],
        strength=h.hp["strength"],
        damping=h.hp["damping"],
        precision="kfac",
        layers=h.model.layers,
      ),
      optax.sgd(h.lr),
    ),  # fmt: skip
    "NCL with Kronecker-factored precision from importance.kfac_factors (every layer); plain SGD",
    "sgd",
    end_task=_consolidate_ncl_kfac,
    defaults=_DEFAULTS,
  )
)
