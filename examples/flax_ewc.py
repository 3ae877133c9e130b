"""EWC, online EWC, SI and MAS as gradient transforms in a Flax NNX loop on a permuted stream.

Each method is ``optax.chain(<penalty transform>, optax.sgd(lr, momentum=0.9))``:
the loss stays the task loss, the penalty gradient is added by the optimiser.

  sgd         plain SGD (fine-tuning)
  ewc         cl_optax.ewc, one penalty per task (exact Fisher, per example)
  online_ewc  cl_optax.online_ewc, running Fisher with decay
  si          cl_optax.si, path integral accumulated inside `update` (no signal)
  mas         cl_optax.mas, importance = mean |d ||f(x)||^2 / d theta|

  python examples/flax_ewc.py --seeds 3
"""

from __future__ import annotations

import argparse

import optax
from _permuted import add_common_args, fisher_batches, main_loop
from flax import nnx

import cl_optax


def methods(args):
  def chain(penalty):
    return lambda n: optax.chain(penalty(), optax.sgd(args.lr, momentum=0.9))

  def end_fisher(optimizer, model, graphdef, data, t):
    params = nnx.state(model, nnx.Param)
    logits_fn = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
    f = cl_optax.importance.fisher_diag(logits_fn, params, fisher_batches(*data), fisher="exact")
    cl_optax.consolidate(optimizer, params, importance=f)

  def end_mas(optimizer, model, graphdef, data, t):
    params = nnx.state(model, nnx.Param)
    fn = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
    omega = cl_optax.importance.mas_sensitivity(fn, params, fisher_batches(*data))
    cl_optax.consolidate(optimizer, params, importance=omega)

  def end_si(optimizer, model, graphdef, data, t):
    cl_optax.consolidate(optimizer, nnx.state(model, nnx.Param))

  return {
    "sgd": (lambda n: optax.sgd(args.lr, momentum=0.9), None),
    "ewc": (chain(lambda: cl_optax.ewc(args.ewc)), end_fisher),
    "online_ewc": (chain(lambda: cl_optax.online_ewc(args.ewc, decay=args.decay)), end_fisher),
    "si": (chain(lambda: cl_optax.si(args.si, xi=args.xi)), end_si),
    "mas": (chain(lambda: cl_optax.mas(args.mas)), end_mas),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_common_args(parser, "sgd,ewc,online_ewc,si,mas")
  parser.add_argument("--ewc", type=float, default=100.0, help="EWC / online EWC lambda")
  parser.add_argument("--decay", type=float, default=0.9, help="online EWC gamma")
  parser.add_argument("--si", type=float, default=1.0, help="SI strength (= 2c)")
  parser.add_argument("--xi", type=float, default=0.1, help="SI's xi (denominator term)")
  parser.add_argument("--mas", type=float, default=0.03, help="MAS strength (= 2 lambda_paper)")
  args = parser.parse_args()
  main_loop(methods(args), args)


if __name__ == "__main__":
  main()
