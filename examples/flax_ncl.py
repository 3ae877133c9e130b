"""Natural continual learning (NCL) in a Flax NNX loop on a permuted stream.

Compares, with SGD + momentum 0.9 as the base step:

  sgd        plain SGD (fine-tuning)
  ncl_diag   cl_optax.ncl with a diagonal Fisher precision (exact label expectation)
  ncl_kfac   cl_optax.ncl with Kronecker-factored precisions per dense layer
             (sampled-label K-FAC factors, as the official code)

After each task the task's Fisher becomes the new prior precision:
``cl_optax.consolidate(optimizer, params, precision=F)``.

  python examples/flax_ncl.py --seeds 3
  python examples/flax_ncl.py --data mnist --n-train 10000 --hidden 1000   # MNIST
"""

from __future__ import annotations

import argparse

import jax
import optax
from _permuted import LAYERS, add_common_args, fisher_batches, main_loop
from flax import nnx

import cl_optax


def methods(args):
  base = lambda: optax.sgd(args.lr, momentum=0.9)  # noqa: E731

  def ncl_tx(precision):
    def make(data_size):
      layers = LAYERS if precision == "kfac" else ()
      return optax.chain(
        cl_optax.ncl(
          data_size, strength=args.strength, damping=args.alpha, precision=precision, layers=layers
        ),
        base(),
      )

    return make

  def end_diag(optimizer, model, graphdef, data, t):
    params = nnx.state(model, nnx.Param)
    logits_fn = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
    f = cl_optax.importance.fisher_diag(logits_fn, params, fisher_batches(*data), fisher="exact")
    cl_optax.consolidate(optimizer, params, precision=f)

  def end_kfac(optimizer, model, graphdef, data, t):
    params = nnx.state(model, nnx.Param)
    fn = lambda p, x, taps: nnx.merge(graphdef, p)(x, taps)  # noqa: E731
    kf = cl_optax.importance.kfac_factors(
      fn,
      params,
      fisher_batches(*data),
      layers=LAYERS,
      fisher="sampled",
      key=jax.random.key(t),
    )
    cl_optax.consolidate(optimizer, params, precision=kf)

  return {
    "sgd": (lambda n: base(), None),
    "ncl_diag": (ncl_tx("diag"), end_diag),
    "ncl_kfac": (ncl_tx("kfac"), end_kfac),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_common_args(parser, "sgd,ncl_diag,ncl_kfac")
  parser.add_argument("--strength", type=float, default=1.0, help="lambda of the pull to mu")
  parser.add_argument("--alpha", type=float, default=1e-3, help="damping alpha")
  args = parser.parse_args()
  main_loop(methods(args), args)


if __name__ == "__main__":
  main()
