"""torch_qmprune: a PyTorch-native pruning plugin built on a spectral geometry of operators.

Every layer, channel or attention head is represented by its normalized singular-value spectrum
(a point on the unit sphere, arXiv 2512.00880 §2.1), compared by Fubini–Study and 2-Wasserstein
distances, and functionally redundant structure is merged into its siblings and removed in one
shot. Two dialects: ``torch.nn.utils.prune`` masks (drop-in names) and Torch-Pruning physical
removal (:func:`prune`, :class:`SpectralImportance`).

Example:
    >>> import torch, torch_qmprune as qmprune
    >>> w = torch.randn(8, 16)
    >>> psi = qmprune.spectral_state(w)
    >>> float(qmprune.fubini_study(psi, psi))
    0.0
"""

from __future__ import annotations

from . import models  # noqa: F401 (qmprune.models.resnet18_fmnist, ...)
from .calibration import CalibrationStats, collect_input_grams, recalibrate_batchnorm
from .dynamics import (
    LindbladPredictor,
    SpectralTracker,
    TrackedImportance,
    WindowRecord,
    channel_residual_energy,
    forecast_channel_redundancy,
    forecast_density_matrix,
    liouvillian,
    tracker_overhead,
)
from .graph import RedundancyGraph, redundancy_graph
from .heads import (
    HeadPruneReport,
    collect_head_grams,
    from_pretrained_pruned,
    head_counts,
    head_scores,
    prune_attention_heads,
    prune_heads,
)
from .hardware import (
    LatencyAllocation,
    available_profiles,
    estimate_latency,
    latency_allocation,
    load_profile,
    measure_latency,
    measure_profile,
    weighted_fubini_study,
)
from .importance import SpectralImportance, greedy_merge_costs
from .lowrank import LowRankReport, factorize_layer, lowrank_compress, select_rank
from .methods import (
    BasePruningMethod,
    CustomFromMask,
    Identity,
    L1Unstructured,
    LnStructured,
    PruningContainer,
    RandomStructured,
    RandomUnstructured,
    SpectralStructured,
    SpectralUnstructured,
    custom_from_mask,
    global_structured,
    global_unstructured,
    identity,
    is_pruned,
    l1_unstructured,
    ln_structured,
    load_pruned_state_dict,
    make_deepcopyable,
    random_structured,
    random_unstructured,
    remove,
    spectral_structured,
    spectral_unstructured,
)
from .operators import (
    OperatorView,
    UnsupportedModuleError,
    channel_matrices,
    head_matrices,
    layer_matrices,
    register_operator,
    unregister_operator,
)
from .policy import (
    PolicyReport,
    QuantumPolicyGate,
    policy_allocation,
    train_policy,
    uniform_allocation,
)
from .schedule import PruningScheduler, rebind_optimizer, rewrap_ddp, schedule_fraction
from .serialization import load_pruned, save_pruned
from .spectral import (
    Theorem21Report,
    augment,
    check_theorem21,
    density_matrix,
    fidelity,
    fubini_study,
    lipschitz_bound,
    majorization_profile,
    operator_matrix,
    pad_states,
    pairwise_fubini_study,
    pairwise_wasserstein2,
    quantum_relative_entropy,
    random_feature_embedding,
    relative_entropy_rank,
    spectral_state,
    spectral_states,
    theorem21_bound,
    truncate_density,
    wasserstein2,
    wasserstein2_states,
)
from .structural import (
    PruneReport,
    available_allocations,
    compensate_group,
    count_params_and_macs,
    prune,
    register_allocation,
)

__version__ = "0.1.0"

__all__ = [
    # geometry (spectral/)
    "spectral_state", "spectral_states", "augment", "operator_matrix", "pad_states",
    "fubini_study", "fidelity", "pairwise_fubini_study", "majorization_profile", "wasserstein2",
    "wasserstein2_states", "pairwise_wasserstein2", "theorem21_bound", "lipschitz_bound",
    "check_theorem21", "Theorem21Report", "density_matrix", "quantum_relative_entropy",
    "truncate_density", "relative_entropy_rank", "random_feature_embedding",
    # operators
    "OperatorView", "UnsupportedModuleError", "register_operator", "unregister_operator",
    "layer_matrices", "channel_matrices", "head_matrices",
    # drop-in torch.nn.utils.prune
    "SpectralStructured", "SpectralUnstructured", "spectral_structured", "spectral_unstructured",
    "global_unstructured", "global_structured", "load_pruned_state_dict", "make_deepcopyable",
    "BasePruningMethod", "PruningContainer", "Identity", "RandomUnstructured", "L1Unstructured",
    "RandomStructured", "LnStructured", "CustomFromMask", "identity", "random_unstructured",
    "l1_unstructured", "random_structured", "ln_structured", "custom_from_mask", "remove",
    "is_pruned",
    # physical pruning
    "prune", "PruneReport", "register_allocation", "available_allocations",
    "SpectralImportance", "greedy_merge_costs", "compensate_group",
    "collect_input_grams", "CalibrationStats", "recalibrate_batchnorm", "count_params_and_macs",
    "save_pruned", "load_pruned",
    # heads
    "prune_attention_heads", "prune_heads", "head_scores", "head_counts", "collect_head_grams",
    "HeadPruneReport", "from_pretrained_pruned",
    # redundancy graph
    "redundancy_graph", "RedundancyGraph",
    # kernel approximation (§3.2) and hardware-aware metric (§5)
    "lowrank_compress", "select_rank", "factorize_layer", "LowRankReport",
    "weighted_fubini_study", "load_profile", "available_profiles", "measure_profile",
    "measure_latency", "estimate_latency", "latency_allocation", "LatencyAllocation",
    # budget-conditioned policy gate (§4)
    "QuantumPolicyGate", "policy_allocation", "uniform_allocation", "train_policy",
    "PolicyReport",
    # pruning inside training loops
    "PruningScheduler", "schedule_fraction", "rebind_optimizer", "rewrap_ddp",
    # time-varying redundancy
    "SpectralTracker", "WindowRecord", "tracker_overhead", "LindbladPredictor", "liouvillian",
    "forecast_channel_redundancy", "forecast_density_matrix", "channel_residual_energy",
    "TrackedImportance",
]
