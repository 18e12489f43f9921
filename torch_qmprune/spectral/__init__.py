"""Spectral geometry of linear operators (arXiv 2512.00880 §2, §3.2, §6): spectral states,
Fubini–Study and Wasserstein distances, the Theorem 2.1 bound, density matrices, embeddings.
"""

from torch_qmprune.spectral.bound import (
    Theorem21Report,
    check_theorem21,
    lipschitz_bound,
    theorem21_bound,
)
from torch_qmprune.spectral.density import (
    density_matrix,
    quantum_relative_entropy,
    relative_entropy_rank,
    truncate_density,
)
from torch_qmprune.spectral.embedding import random_feature_embedding
from torch_qmprune.spectral.metrics import (
    fidelity,
    fubini_study,
    pad_states,
    pairwise_fubini_study,
)
from torch_qmprune.spectral.states import (
    augment,
    operator_matrix,
    spectral_state,
    spectral_states,
)
from torch_qmprune.spectral.wasserstein import (
    majorization_profile,
    pairwise_wasserstein2,
    wasserstein2,
    wasserstein2_states,
)

__all__ = [
    "Theorem21Report",
    "augment",
    "check_theorem21",
    "density_matrix",
    "fidelity",
    "fubini_study",
    "lipschitz_bound",
    "majorization_profile",
    "operator_matrix",
    "pad_states",
    "pairwise_fubini_study",
    "pairwise_wasserstein2",
    "quantum_relative_entropy",
    "random_feature_embedding",
    "relative_entropy_rank",
    "spectral_state",
    "spectral_states",
    "theorem21_bound",
    "truncate_density",
    "wasserstein2",
    "wasserstein2_states",
]
