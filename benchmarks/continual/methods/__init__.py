"""The registered methods, one module per family (entry and hooks together).

Importing a module registers its methods; the order here is the CLI's default order
(so the imports are not sorted).
"""
# ruff: noqa: I001

from benchmarks.continual.methods import baselines  # noqa: F401  sgd, adam
from benchmarks.continual.methods import masking  # noqa: F401  soft_mask, freeze
from benchmarks.continual.methods import memory_projection  # noqa: F401  agem, gem
from benchmarks.continual.methods import rehearsal  # noqa: F401  er, der, derpp, lwf
from benchmarks.continual.methods import class_il  # noqa: F401  er_ace, gdumb
from benchmarks.continual.methods import class_il_distill  # noqa: F401  icarl, wa
from benchmarks.continual.methods import xder  # noqa: F401  xder
from benchmarks.continual.methods import bic  # noqa: F401  bic
from benchmarks.continual.methods import regularization  # noqa: F401  ewc, online_ewc, mas, si, rwalk
from benchmarks.continual.methods import agem_code  # noqa: F401  ewc_agem_code, mas_agem_code
from benchmarks.continual.methods import precision  # noqa: F401  ncl, ncl_kfac
from benchmarks.continual.methods import orthogonal_projection  # noqa: F401  ogd, gpm, sgp, nscl
from benchmarks.continual.methods import trust_region  # noqa: F401  trgp
from benchmarks.continual.methods import isolation  # noqa: F401  hat, packnet, wsn
