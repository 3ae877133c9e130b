"""cl_optax: continual-learning methods as composable Optax transformations."""

from cl_optax import adapters as adapters
from cl_optax import importance as importance
from cl_optax import isolation as isolation
from cl_optax import losses as losses
from cl_optax import metrics as metrics
from cl_optax import replay as replay
from cl_optax import streams as streams
from cl_optax._debug import debug as debug
from cl_optax._debug import set_debug as set_debug
from cl_optax._state import ContinualState as ContinualState
from cl_optax._state import consolidate as consolidate
from cl_optax._state import unread_extra_args as unread_extra_args
from cl_optax._trees import selected as selected
from cl_optax._unit_resets import UnitResetsState as UnitResetsState
from cl_optax._unit_resets import UnitSelector as UnitSelector
from cl_optax._unit_resets import redo_selector as redo_selector
from cl_optax._unit_resets import unit_resets as unit_resets
from cl_optax._weight_align import weight_align as weight_align
from cl_optax._writes import BoundaryWritesState as BoundaryWritesState
from cl_optax._writes import PendingWrite as PendingWrite
from cl_optax._writes import apply_pending_writes as apply_pending_writes
from cl_optax._writes import boundary_writes as boundary_writes
from cl_optax._writes import check_writes_last as check_writes_last
from cl_optax.adapters import InfLoRAState as InfLoRAState
from cl_optax.adapters import OLoRAState as OLoRAState
from cl_optax.adapters import inflora as inflora
from cl_optax.adapters import olora as olora
from cl_optax.isolation import HATState as HATState
from cl_optax.isolation import PackNetState as PackNetState
from cl_optax.isolation import WSNMasks as WSNMasks
from cl_optax.isolation import hat as hat
from cl_optax.isolation import hat_anneal as hat_anneal
from cl_optax.isolation import hat_gate as hat_gate
from cl_optax.isolation import packnet as packnet
from cl_optax.isolation import packnet_params as packnet_params
from cl_optax.isolation import packnet_share as packnet_share
from cl_optax.isolation import wsn_kth as wsn_kth
from cl_optax.isolation import wsn_mask as wsn_mask
from cl_optax.masking import FreezeState as FreezeState
from cl_optax.masking import SoftMaskState as SoftMaskState
from cl_optax.masking import freeze as freeze
from cl_optax.masking import soft_mask as soft_mask
from cl_optax.plasticity import AdamGnTState as AdamGnTState
from cl_optax.plasticity import CBPStats as CBPStats
from cl_optax.plasticity import L2InitState as L2InitState
from cl_optax.plasticity import ParamNoiseState as ParamNoiseState
from cl_optax.plasticity import ShrinkPerturbState as ShrinkPerturbState
from cl_optax.plasticity import adam_gnt as adam_gnt
from cl_optax.plasticity import cbp_selector as cbp_selector
from cl_optax.plasticity import continual_backprop as continual_backprop
from cl_optax.plasticity import l2_init as l2_init
from cl_optax.plasticity import param_noise as param_noise
from cl_optax.plasticity import redo as redo
from cl_optax.plasticity import scale_by_adam_gnt as scale_by_adam_gnt
from cl_optax.plasticity import shrink_perturb as shrink_perturb
from cl_optax.precision import NCLState as NCLState
from cl_optax.precision import ncl as ncl
from cl_optax.projection import AGEMState as AGEMState
from cl_optax.projection import ConvRepresentations as ConvRepresentations
from cl_optax.projection import GEMState as GEMState
from cl_optax.projection import GPMState as GPMState
from cl_optax.projection import NSCLState as NSCLState
from cl_optax.projection import OGDState as OGDState
from cl_optax.projection import SGPState as SGPState
from cl_optax.projection import TRGPState as TRGPState
from cl_optax.projection import TRGPView as TRGPView
from cl_optax.projection import agem as agem
from cl_optax.projection import conv_representations as conv_representations
from cl_optax.projection import gem as gem
from cl_optax.projection import gpm as gpm
from cl_optax.projection import nscl as nscl
from cl_optax.projection import nscl_batch_means as nscl_batch_means
from cl_optax.projection import null_space_projector as null_space_projector
from cl_optax.projection import ogd as ogd
from cl_optax.projection import sgp as sgp
from cl_optax.projection import trgp as trgp
from cl_optax.projection import trgp_scaled_kernel as trgp_scaled_kernel
from cl_optax.projection import trgp_trust_region as trgp_trust_region
from cl_optax.projection import trgp_view as trgp_view
from cl_optax.regularization import EWCState as EWCState
from cl_optax.regularization import MASState as MASState
from cl_optax.regularization import OnlineEWCState as OnlineEWCState
from cl_optax.regularization import RWalkState as RWalkState
from cl_optax.regularization import SIState as SIState
from cl_optax.regularization import TaskFreeState as TaskFreeState
from cl_optax.regularization import ewc as ewc
from cl_optax.regularization import mas as mas
from cl_optax.regularization import online_ewc as online_ewc
from cl_optax.regularization import rwalk as rwalk
from cl_optax.regularization import si as si
from cl_optax.regularization import task_free as task_free
from cl_optax.replay import ExperienceReplayState as ExperienceReplayState
from cl_optax.replay import experience_replay as experience_replay

__version__ = "0.1.0"

__all__ = [
  "adam_gnt",
  "AdamGnTState",
  "adapters",
  "agem",
  "AGEMState",
  "apply_pending_writes",
  "boundary_writes",
  "BoundaryWritesState",
  "cbp_selector",
  "CBPStats",
  "check_writes_last",
  "consolidate",
  "continual_backprop",
  "ContinualState",
  "conv_representations",
  "ConvRepresentations",
  "debug",
  "ewc",
  "EWCState",
  "experience_replay",
  "ExperienceReplayState",
  "freeze",
  "FreezeState",
  "gem",
  "GEMState",
  "hat",
  "hat_anneal",
  "hat_gate",
  "HATState",
  "gpm",
  "GPMState",
  "importance",
  "isolation",
  "inflora",
  "InfLoRAState",
  "l2_init",
  "L2InitState",
  "losses",
  "mas",
  "MASState",
  "metrics",
  "ncl",
  "NCLState",
  "nscl",
  "nscl_batch_means",
  "NSCLState",
  "null_space_projector",
  "ogd",
  "OGDState",
  "olora",
  "OLoRAState",
  "online_ewc",
  "OnlineEWCState",
  "packnet",
  "packnet_params",
  "packnet_share",
  "PackNetState",
  "param_noise",
  "ParamNoiseState",
  "PendingWrite",
  "redo",
  "redo_selector",
  "replay",
  "scale_by_adam_gnt",
  "selected",
  "set_debug",
  "sgp",
  "SGPState",
  "shrink_perturb",
  "ShrinkPerturbState",
  "rwalk",
  "RWalkState",
  "si",
  "SIState",
  "task_free",
  "trgp",
  "trgp_scaled_kernel",
  "trgp_trust_region",
  "trgp_view",
  "TRGPState",
  "TRGPView",
  "TaskFreeState",
  "soft_mask",
  "SoftMaskState",
  "streams",
  "unit_resets",
  "UnitResetsState",
  "UnitSelector",
  "unread_extra_args",
  "wsn_kth",
  "wsn_mask",
  "WSNMasks",
  "weight_align",
]
