"""One name per concept: kept hyper-parameters follow their factory; state fields are unique;
the library, examples and benchmarks spell every name the one way and import public modules only.
"""

import functools
import importlib
import pathlib
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import cl_optax

PARAMS = {"kernel": jnp.arange(6.0).reshape(3, 2) / 6.0, "bias": jnp.ones(2)}
GRADS = jax.tree.map(lambda p: jnp.cos(p) - 0.5, PARAMS)


def test_gpm_threshold_signal_overrides_the_factory_threshold():
  params = {"kernel": jnp.zeros((3, 2))}
  reps = {"kernel": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.1]])}
  tx = cl_optax.gpm(threshold=0.4)
  new = cl_optax.consolidate(
    tx.init(params), params, representations=reps, threshold={"kernel": 0.999}
  )
  assert int(new.feature_count["kernel"]) == 3  # 0.999 of the energy needs all three
  default = cl_optax.consolidate(tx.init(params), params, representations=reps)
  assert int(default.feature_count["kernel"]) == 1  # the factory's 0.4


def test_kept_hyperparameters_follow_inject_hyperparams():
  """The naming rule: a hyper-parameter kept in the state is refreshed at every update."""
  cases = [
    (cl_optax.freeze, {"threshold": 0.5}, "threshold", "freeze_threshold"),
    (cl_optax.online_ewc, {"decay": 0.5}, "decay", "online_ewc_decay"),
    (cl_optax.si, {"xi": 0.5}, "xi", "si_xi"),
    (cl_optax.gpm, {"threshold": 0.5}, "threshold", "gpm_threshold"),
    (functools.partial(cl_optax.trgp, max_tasks=2), {"eps": 0.5}, "eps", "trgp_eps"),
    (cl_optax.ncl, {"data_size": 1.0, "decay": 0.5}, "decay", "ncl_decay"),
  ]
  for factory, kw, hp, field in cases:
    tx = optax.inject_hyperparams(factory)(**kw)
    state = tx.init(PARAMS)
    state.hyperparams[hp] = jnp.asarray(0.25)
    _, state = tx.update(GRADS, state, PARAMS)
    assert float(optax.tree.get(state, field)) == 0.25, (factory.__name__, field)


def test_state_fields_are_unique_across_transforms():
  """``optax.tree.get(opt_state, name)`` finds one field, whichever transforms are chained."""
  states = [
    cl_optax.SoftMaskState,
    cl_optax.FreezeState,
    cl_optax.AGEMState,
    cl_optax.GEMState,
    cl_optax.OGDState,
    cl_optax.GPMState,
    cl_optax.SGPState,
    cl_optax.NSCLState,
    cl_optax.TRGPState,
    cl_optax.NCLState,
    cl_optax.EWCState,
    cl_optax.OnlineEWCState,
    cl_optax.MASState,
    cl_optax.SIState,
    cl_optax.RWalkState,
    cl_optax.TaskFreeState,
    cl_optax.ExperienceReplayState,
    cl_optax.BoundaryWritesState,
    cl_optax.UnitResetsState,
    cl_optax.L2InitState,
    cl_optax.ShrinkPerturbState,
    cl_optax.ParamNoiseState,
    cl_optax.HATState,
    cl_optax.PackNetState,
    cl_optax.CBPStats,
    cl_optax.AdamGnTState,
    cl_optax.OLoRAState,
    cl_optax.InfLoRAState,
  ]
  seen = {}
  for s in states:
    for f in s._fields:
      assert f not in seen, f"{f} is a field of both {seen[f]} and {s.__name__}"
      seen[f] = s.__name__


# --------------------------------------------------------- spellings in code
ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(
  p for d in ("cl_optax", "examples", "benchmarks") for p in (ROOT / d).rglob("*.py")
)
PROGRAMS = [p for p in SOURCES if p.parts[len(ROOT.parts)] != "cl_optax"]
# A renamed name, as a regular expression, and the name to write instead.
OLD_SPELLINGS = [
  (r"\bmemory_strength\b", "gem(strength=)"),
  (r"\bsi\([^)]*\bdamping\b|\bsi_damping\b", "si(xi=) and the state field si_xi"),
  (r"\bconsolidate\([^)]*\bgpm_threshold=", "the consolidate signal threshold="),
  (r"\benergy_threshold\b", "the GPMState field gpm_threshold"),
  (r"\banchor_params\b", "the state fields ewc_anchor, online_ewc_anchor, mas_anchor, si_anchor"),
  (r"\bimportance\.mas\(|\b_mas_importance\b", "importance.mas_sensitivity"),
  (
    r"\bcl_optax\.output_gradients\b|\bprojection\.output_gradients\b",
    "cl_optax.importance.output_gradients",
  ),
  (r"\brenamed_(arguments|signal)\b", "the new name (renamed names are not shimmed)"),
]
# ``cl_optax._x`` anywhere, or ``from cl_optax... import _x``.
PRIVATE_IMPORT = re.compile(
  r"\bcl_optax\._\w+|^\s*from\s+cl_optax\S*\s+import\s+_\w+", re.MULTILINE
)


def _rel(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


def test_sources_found():
  assert any(_rel(p).startswith("examples/") for p in PROGRAMS)
  assert any(_rel(p).startswith("benchmarks/") for p in PROGRAMS)


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_old_spellings(path):
  text = path.read_text()
  found = [
    f"{_rel(path)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r} (write {new})"
    for pattern, new in OLD_SPELLINGS
    for m in re.finditer(pattern, text)
  ]
  assert not found, "old spellings:\n" + "\n".join(found)


@pytest.mark.parametrize("path", PROGRAMS, ids=_rel)
def test_programs_import_public_modules_only(path):
  """Examples and benchmarks use ``cl_optax``'s public modules, never a private ``cl_optax._x``."""
  hits = [m.group(0).strip() for m in PRIVATE_IMPORT.finditer(path.read_text())]
  assert not hits, f"{_rel(path)} reaches into private modules: {hits}"


@pytest.mark.parametrize(
  "name",
  ["cl_optax"] + [f"cl_optax.{p.stem}" for p in sorted((ROOT / "cl_optax").glob("[!_]*.py"))],
)
def test_public_module_lists_its_names(name):
  """Every public module has ``__all__``, and every name in it exists."""
  mod = importlib.import_module(name)
  assert getattr(mod, "__all__", None), f"{name} has no __all__"
  missing = [n for n in mod.__all__ if not hasattr(mod, n)]
  assert not missing, (name, missing)


def test_estimators_and_transforms_do_not_share_names():
  """``cl_optax.importance`` names estimators; none is also a transform of ``cl_optax``."""
  shared = set(cl_optax.importance.__all__) & set(cl_optax.__all__)
  assert not shared, shared
