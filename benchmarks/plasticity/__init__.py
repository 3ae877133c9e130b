"""Loss-of-plasticity benchmarks.

Slowly-changing regression, online permuted MNIST, and the stability-plasticity chain.

See ``benchmarks/plasticity/RESULTS.md`` for the commands and the numbers.
"""
