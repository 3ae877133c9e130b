"""cl_optax: continual-learning methods as composable Optax transformations."""

from cl_optax import importance as importance
from cl_optax import losses as losses
from cl_optax import metrics as metrics
from cl_optax import replay as replay
from cl_optax import streams as streams
from cl_optax._state import ContinualState as ContinualState
from cl_optax._state import consolidate as consolidate
from cl_optax.masking import FreezeState as FreezeState
from cl_optax.masking import SoftMaskState as SoftMaskState
from cl_optax.masking import freeze as freeze
from cl_optax.masking import soft_mask as soft_mask
from cl_optax.precision import NCLState as NCLState
from cl_optax.precision import ncl as ncl
from cl_optax.projection import AGEMState as AGEMState
from cl_optax.projection import GEMState as GEMState
from cl_optax.projection import GPMState as GPMState
from cl_optax.projection import OGDState as OGDState
from cl_optax.projection import agem as agem
from cl_optax.projection import gem as gem
from cl_optax.projection import gpm as gpm
from cl_optax.projection import ogd as ogd
from cl_optax.regularization import EWCState as EWCState
from cl_optax.regularization import MASState as MASState
from cl_optax.regularization import OnlineEWCState as OnlineEWCState
from cl_optax.regularization import SIState as SIState
from cl_optax.regularization import ewc as ewc
from cl_optax.regularization import mas as mas
from cl_optax.regularization import online_ewc as online_ewc
from cl_optax.regularization import si as si
from cl_optax.replay import ExperienceReplayState as ExperienceReplayState
from cl_optax.replay import experience_replay as experience_replay

__version__ = "0.1.0"

__all__ = [
  "agem",
  "AGEMState",
  "consolidate",
  "ContinualState",
  "ewc",
  "EWCState",
  "experience_replay",
  "ExperienceReplayState",
  "freeze",
  "FreezeState",
  "gem",
  "GEMState",
  "gpm",
  "GPMState",
  "importance",
  "losses",
  "mas",
  "MASState",
  "metrics",
  "ncl",
  "NCLState",
  "ogd",
  "OGDState",
  "online_ewc",
  "OnlineEWCState",
  "replay",
  "si",
  "SIState",
  "soft_mask",
  "SoftMaskState",
  "streams",
]
