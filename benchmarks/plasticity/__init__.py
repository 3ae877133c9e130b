"""Loss-of-plasticity benchmarks: slowly-changing regression, online permuted MNIST, stability-plasticity chain.

See ``benchmarks/plasticity/RESULTS.md`` for the commands and the numbers.
"""
