"""Fine-tuning baselines: the base optimiser alone."""

import optax

from benchmarks.continual.registry import Method, register

register(Method("sgd", lambda h: optax.sgd(h.lr), "plain SGD (fine-tuning baseline)", "sgd"))
register(Method("adam", lambda h: optax.adam(h.lr), "plain Adam (fine-tuning baseline)", "adam"))
