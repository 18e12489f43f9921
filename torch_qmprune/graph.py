"""The quantum-inspired functional redundancy graph, QM-FRG (arXiv 2512.00880 §3.1, §3.4):
operators as vertices, Fubini–Study (or W₂) distances as edges, spectral clustering, export.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from torch_qmprune.operators import (
    BUILTIN_KINDS,
    HEAD_KINDS,
    _walk,
    channel_matrices,
    operator_views,
)
from torch_qmprune.spectral import (
    pad_states,
    pairwise_fubini_study,
    pairwise_wasserstein2,
    spectral_state,
    spectral_states,
)

if TYPE_CHECKING:
    import networkx
    from matplotlib.figure import Figure

__all__ = ["RedundancyGraph", "redundancy_graph"]

LEVELS = ("layer", "channel", "head")
METRICS = ("fs", "w2")
_METRIC_NAMES = {"fs": "Fubini–Study distance (rad)", "w2": "2-Wasserstein distance"}
_JSON_FORMAT = "torch_qmprune.RedundancyGraph"
_COLUMN_NAMES = {
    "name": "name", "kind": "kind", "state": "ψ (leading entries)", "vertices": "vertices",
    "nearest": "nearest sibling", "nearest_distance": "distance to it",
    "min_nearest_distance": "min nearest-sibling distance",
    "median_nearest_distance": "median nearest-sibling distance",
    "redundant": "in clusters of ≥ 2", "cluster": "cluster",
}
_KMEANS_MAX_K = 32  # above this many clusters, labels come from cluster_qr instead of k-means
_CHANNEL_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


# ---------------------------------------------------------------------------------------------
# the graph object
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class RedundancyGraph:
    """A QM-FRG (§3.1): ``n`` operators and their pairwise spectral distances.

    Attributes:
        names: vertex names (module path, ``path.qk`` / ``path.vo`` for attention at layer
            level, ``path[i]`` for channel ``i``, ``path.head{h}`` for head ``h``).
        distance: ``(n, n)`` float tensor, symmetric, zero diagonal; ``inf`` means "no edge"
            (channels of different layers).
        states: ``(n, d)`` spectral states, zero-padded to a common length (§2.2); for heads
            the ``qk`` and ``vo`` states side by side (see ``state_parts``).
        level: ``"layer"``, ``"channel"`` or ``"head"``.
        metric: ``"fs"`` (Fubini–Study, §2.3) or ``"w2"`` (Wasserstein-2 of the majorization
            profiles, Thm 2.1).
        kinds: operator kind per vertex (``"linear"``, ``"conv"``, ``"head-qk"``, ...).
        blocks: layer / attention-module name -> ``slice`` of its vertices (channel and head
            levels; empty at layer level).
        state_parts: column slices of ``states`` per part (``{"qk": ..., "vo": ...}`` for
            heads, empty otherwise).
        augment: whether states used the bias augmentation.
        hardware_weights: the Eq. (9) costs used, or ``None``.

    Example:
        >>> g = redundancy_graph(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
        >>> len(g), g.distance.shape
        (2, torch.Size([2, 2]))
    """

    names: list[str]
    distance: Tensor
    states: Tensor
    level: str
    metric: str
    kinds: list[str] = dataclasses.field(default_factory=list)
    blocks: dict[str, slice] = dataclasses.field(default_factory=dict)
    state_parts: dict[str, slice] = dataclasses.field(default_factory=dict)
    augment: bool = True
    hardware_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        n = len(self.names)
        if tuple(self.distance.shape) != (n, n):
            raise ValueError(
                f"distance has shape {tuple(self.distance.shape)}; expected ({n}, {n}) for "
                f"{n} names"
            )
        if self.states.ndim != 2 or self.states.shape[0] != n:
            raise ValueError(f"states has shape {tuple(self.states.shape)}; expected ({n}, d)")
        if not self.kinds:
            self.kinds = ["operator"] * n
        if len(self.kinds) != n:
            raise ValueError(f"kinds has {len(self.kinds)} entries; expected {n}")
        _check_choice(self.level, LEVELS, "level")
        _check_choice(self.metric, METRICS, "metric")

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (
            f"RedundancyGraph(level={self.level!r}, metric={self.metric!r}, n={len(self)}, "
            f"blocks={len(self.blocks)})"
        )

    # -- clustering (§3.4) ----------------------------------------------------------------

    def cluster(
        self,
        n_clusters: int | Mapping[str, int] | None = None,
        threshold: float | None = None,
        random_state: int | None = 0,
        per_layer: bool | None = None,
        bandwidth: str | float = "nearest",
    ) -> list[list[int]]:
        """Spectral clustering of the QM-FRG (§3.4): groups of mutually redundant operators.

        Affinity ``A_ij = exp(−d_ij² / (2·σ²))`` (``inf`` distances give 0), fed to
        ``sklearn.cluster.SpectralClustering(affinity="precomputed")``. The bandwidth ``σ``:

        - ``"nearest"`` (default): the median over vertices of the distance to the nearest
          other vertex, floored at 1e-3 x the median positive distance. It is the scale of
          redundancy (near-duplicates), so clusters of near-duplicates come out as nearly
          disconnected blocks and exact duplicates as connected components.
        - ``"median"``: the median of all finite off-diagonal distances. Simple, but between
          well separated groups most pairs are "between", so the median is a between-group
          distance, cross-group affinities stay near ``e^{-1/2}`` and the eigengap tends to
          under-split (measured on 3 separated Gaussian groups of 4: ``k = 3`` in 0 of 20
          random trials, vs 20 of 20 with ``"nearest"``).
        - a positive float: ``σ`` itself.

        With ``n_clusters=None`` the eigengap heuristic picks ``k``: with ``λ₁ ≤ … ≤ λ_n`` the
        eigenvalues of the normalized Laplacian ``I − D^{-1/2} A D^{-1/2}`` (no self loops),
        ``k = argmax_{1 ≤ k < n} (λ_{k+1} − λ_k)``, and at least the number of connected
        components. It cannot tell "one cluster" from "no redundancy" (equidistant operators
        give ``k = 1``), and on a continuum of states (e.g. the 2-entry channel states of
        Linear rows) the nearest-neighbour bandwidth fragments it into many small clusters of
        close neighbours (a random-init ResNet-18 ``fc``: ~320 clusters of 1000 rows). Pass
        ``n_clusters`` or ``threshold`` when merging is at stake.

        Labels are assigned by k-means (seeded by ``random_state``) for ``k ≤ 32`` and by
        sklearn's ``cluster_qr`` above (k-means with hundreds of centres dominates the run
        time). Exact duplicates (distance 0) are never separated: spectral clustering runs on one
        copy of each, so fewer than ``n_clusters`` clusters come back when the graph has fewer
        distinct operators.

        With ``threshold`` the clustering is complete-linkage agglomerative on the distances
        instead: every pair inside a cluster is closer than ``threshold``.

        Args:
            n_clusters: number of clusters; per layer, an int applies to every block (clipped
                to its size) and a mapping ``{block name: k}`` sets blocks individually
                (missing blocks use the eigengap).
            threshold: maximum within-cluster distance (exclusive); excludes ``n_clusters``.
            random_state: seed of the k-means step.
            per_layer: cluster each block separately (default ``True`` at channel level,
                where channels of different layers share no edge, ``False`` otherwise).
            bandwidth: ``"nearest"``, ``"median"`` or a positive float (see above).

        Returns:
            Lists of vertex indices (sorted), most redundant cluster first: ranked by mean
            intra-cluster distance ascending; singletons (nothing to merge) last.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 9), nn.Linear(4, 4))
            >>> _ = net[2].load_state_dict(net[0].state_dict())  # a duplicate of layer 0
            >>> g = redundancy_graph(net.append(nn.Linear(9, 2)))
            >>> g.cluster(n_clusters=3)[0]
            [0, 2]
        """
        if not (
            (isinstance(bandwidth, str) and bandwidth in ("nearest", "median"))
            or (
                isinstance(bandwidth, (int, float))
                and not isinstance(bandwidth, bool)
                and math.isfinite(bandwidth)
                and bandwidth > 0
            )
        ):
            raise ValueError(
                f"bandwidth must be 'nearest', 'median' or a positive float, got {bandwidth!r}"
            )
        if n_clusters is not None and threshold is not None:
            raise ValueError(
                f"pass n_clusters or threshold, not both (got n_clusters={n_clusters!r}, "
                f"threshold={threshold!r})"
            )
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not (math.isfinite(threshold) and threshold > 0)
        ):
            raise ValueError(f"threshold must be a positive finite float, got {threshold!r}")
        if per_layer is None:
            per_layer = self.level == "channel"
        dist = self._numpy_distance()
        if not per_layer:
            if isinstance(n_clusters, Mapping):
                raise ValueError("a mapping n_clusters needs per_layer=True")
            k = _check_k(n_clusters, "n_clusters")
            if k is not None and k > len(self):
                raise ValueError(f"n_clusters={k} exceeds the number of vertices ({len(self)})")
            groups = _cluster_matrix(dist, k, threshold, random_state, bandwidth)
            return self._rank(groups)
        if not self.blocks:
            raise ValueError(
                f"per_layer=True needs blocks, which level={self.level!r} graphs do not have; "
                "use level='channel' or 'head'"
            )
        if isinstance(n_clusters, Mapping):
            unknown = sorted(set(n_clusters) - set(self.blocks))
            if unknown:
                raise ValueError(
                    f"n_clusters names unknown blocks {unknown}; blocks are {list(self.blocks)}"
                )
        groups = []
        for name, sl in self.blocks.items():
            idx = np.arange(len(self))[sl]
            k = n_clusters.get(name) if isinstance(n_clusters, Mapping) else n_clusters
            k = _check_k(k, f"n_clusters[{name!r}]")
            k = None if k is None else min(k, len(idx))
            sub = _cluster_matrix(dist[np.ix_(idx, idx)], k, threshold, random_state, bandwidth)
            groups.extend([int(idx[i]) for i in group] for group in sub)
        return self._rank(groups)

    def _rank(self, groups: list[list[int]]) -> list[list[int]]:
        dist = self._numpy_distance()

        def key(group: list[int]) -> tuple[float, int]:
            if len(group) < 2:
                return math.inf, group[0]
            sub = dist[np.ix_(group, group)]
            return float(sub[np.triu_indices(len(group), 1)].mean()), group[0]

        return sorted((sorted(g) for g in groups if g), key=key)

    def representatives(self, clusters: Sequence[Sequence[int]]) -> list[int]:
        """Medoid of each cluster (§3.4: the operator a cluster is merged into).

        The medoid minimizes the sum of distances to the other members (ties: lowest index).

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
            >>> _ = net[2].load_state_dict(net[0].state_dict())
            >>> g = redundancy_graph(net)
            >>> g.representatives([[0, 1, 2]])
            [0]
        """
        dist = self._numpy_distance()
        finite = np.where(np.isfinite(dist), dist, np.nanmax(dist[np.isfinite(dist)]) * 4 + 1)
        reps = []
        for c, members in enumerate(clusters):
            idx = [_check_index(i, len(self), f"clusters[{c}]") for i in members]
            if not idx:
                raise ValueError(f"clusters[{c}] is empty; every cluster needs a vertex")
            costs = finite[np.ix_(idx, idx)].sum(axis=1)
            reps.append(idx[int(np.argmin(costs))])
        return reps

    def most_redundant_pairs(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The ``k`` closest pairs ``(name_i, name_j, distance)``, closest first (§3.1).

        Only pairs joined by an edge (finite distance) count; ties by vertex index.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
            >>> _ = net[2].load_state_dict(net[0].state_dict())
            >>> g = redundancy_graph(net)
            >>> g.most_redundant_pairs(1)
            [('0', '2', 0.0)]
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        dist = self._numpy_distance()
        i, j = np.triu_indices(len(self), 1)
        d = dist[i, j]
        keep = np.isfinite(d)
        i, j, d = i[keep], j[keep], d[keep]
        order = np.lexsort((j, i, d))[:k]
        return [(self.names[i[o]], self.names[j[o]], float(d[o])) for o in order]

    # -- export -----------------------------------------------------------------------------

    def to_networkx(self) -> networkx.Graph:
        """The graph as ``networkx.Graph``: nodes are names, ``weight`` = distance (§3.1).

        Node attributes: ``index``, ``kind`` and, at channel/head level, ``block``. Vertex
        pairs without an edge (``inf``) are not connected, so a layer-level graph is complete
        (``n(n−1)/2`` edges). Graph attributes: ``level``, ``metric``.

        Example:
            >>> g = redundancy_graph(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)))
            >>> g.to_networkx().number_of_edges()
            1
        """
        import networkx as nx

        graph = nx.Graph(level=self.level, metric=self.metric)
        block_of = self._block_of()
        for idx, name in enumerate(self.names):
            attrs: dict[str, Any] = {"index": idx, "kind": self.kinds[idx]}
            if idx in block_of:
                attrs["block"] = block_of[idx]
            graph.add_node(name, **attrs)
        dist = self._numpy_distance()
        i, j = np.triu_indices(len(self), 1)
        for a, b in zip(i.tolist(), j.tolist()):
            if math.isfinite(dist[a, b]):
                graph.add_edge(self.names[a], self.names[b], weight=float(dist[a, b]))
        return graph

    def to_json(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        precision: str | None = None,
        full_matrix: bool = False,
    ) -> dict[str, Any]:
        """JSON-ready dict of the graph (written to ``path`` if given); see :meth:`from_json`.

        Compact by default: only the edges in the graph are stored, as the upper triangle
        (``i < j``, row-major) of each diagonal block of ``distance`` (``"distance_upper"``:
        one block per layer at channel level, since channels of different layers share no
        edge; one block of all vertices at layer and head level). The diagonal (zero), the
        lower triangle (symmetry) and the ``inf`` outside the blocks are implied. A ResNet-18
        channel-level graph (5,800 vertices) takes 28 MB this way instead of 240 MB for the
        dense matrix (17 MB with ``precision="float32"``). A distance matrix that is not
        symmetric with a zero diagonal is stored dense.

        Args:
            path: file to write (``json.dump``, no indentation); ``None``: only return the dict.
            precision: ``None`` (default: the graph's own dtype, so floats round-trip
                exactly) or ``"float32"``: distances and states written as the shortest
                decimals that read back as the same float32 (~7 significant digits, about
                half the size for a float64 graph; what ``qmprune analyze`` writes).
                ``"float64"`` keeps full double precision.
            full_matrix: store the dense ``n x n`` matrix (``"distance"``, ``null`` for
                ``inf``) as format version 1 did, e.g. for tools that read it directly.

        ``inf`` distances are stored as ``null``; :meth:`from_json` reads every variant.

        Example:
            >>> g = redundancy_graph(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)))
            >>> torch.equal(RedundancyGraph.from_json(g.to_json()).distance, g.distance)
            True
            >>> g.to_json()["distance_upper"][0]["start"], g.to_json()["distance_upper"][0]["stop"]
            (0, 2)
        """
        if precision is None:
            precision = "float32" if self.distance.dtype == torch.float32 else "float64"
        _check_choice(precision, ("float32", "float64"), "precision")
        if not isinstance(full_matrix, bool):
            raise TypeError(f"full_matrix must be a bool, got {full_matrix!r}")
        dist = self._numpy_distance()
        data: dict[str, Any] = {
            "format": _JSON_FORMAT,
            "version": 2,
            "level": self.level,
            "metric": self.metric,
            "augment": self.augment,
            "hardware_weights": self.hardware_weights,
            "dtype": str(self.distance.dtype).removeprefix("torch."),
            "precision": precision,
            "names": list(self.names),
            "kinds": list(self.kinds),
            "blocks": {k: [s.start, s.stop] for k, s in self.blocks.items()},
            "state_parts": {k: [s.start, s.stop] for k, s in self.state_parts.items()},
        }
        spans = None if full_matrix else self._distance_spans(dist)
        if spans is None:
            data["distance"] = _json_floats(dist, precision)
        else:
            data["distance_upper"] = [
                {"start": a, "stop": b,
                 "values": _json_floats(dist[a:b, a:b][np.triu_indices(b - a, 1)], precision)}
                for a, b in spans
            ]
        data["states"] = _json_floats(self.states.detach().cpu().double().numpy(), precision)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(data, fh, allow_nan=False)
        return data

    @classmethod
    def from_json(cls, source: Mapping[str, Any] | str | os.PathLike[str]) -> RedundancyGraph:
        """Rebuild a graph from :meth:`to_json`'s dict or a path to the file it wrote.

        Reads the compact (``"distance_upper"``) and the dense (``"distance"``, format
        version 1 or ``full_matrix=True``) layouts.

        Example:
            >>> g = redundancy_graph(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)))
            >>> RedundancyGraph.from_json(g.to_json()).names
            ['0', '1']
        """
        if isinstance(source, (str, os.PathLike)):
            with open(source, encoding="utf-8") as fh:
                data = json.load(fh)
        elif isinstance(source, Mapping):
            data = source
        else:
            raise TypeError(
                f"source must be a dict from to_json() or a path, got {type(source).__name__}"
            )
        if data.get("format") != _JSON_FORMAT:
            raise ValueError(
                f"not a RedundancyGraph JSON: format={data.get('format')!r}, expected "
                f"{_JSON_FORMAT!r}"
            )
        dtype = getattr(torch, data.get("dtype", "float64"))
        n = len(data["names"])
        if "distance" in data:
            dist = _from_json_floats(data["distance"]).reshape(n, n)
        elif "distance_upper" in data:
            dist = np.full((n, n), np.inf)
            for block in data["distance_upper"]:
                a, b = int(block["start"]), int(block["stop"])
                if not 0 <= a <= b <= n:
                    raise ValueError(f"distance_upper block [{a}, {b}) is outside 0..{n}")
                sub = np.zeros((b - a, b - a))
                iu = np.triu_indices(b - a, 1)
                values = _from_json_floats(block["values"])
                if values.size != iu[0].size:
                    raise ValueError(
                        f"distance_upper block [{a}, {b}) has {values.size} values; expected "
                        f"{iu[0].size} (its upper triangle)"
                    )
                sub[iu] = values
                dist[a:b, a:b] = sub + sub.T
        else:
            raise ValueError("RedundancyGraph JSON has neither 'distance' nor 'distance_upper'")
        states = torch.from_numpy(_from_json_floats(data["states"])).reshape(n, -1)
        return cls(
            names=list(data["names"]),
            distance=torch.from_numpy(dist).to(dtype),
            states=states.to(dtype),
            level=data["level"],
            metric=data["metric"],
            kinds=list(data["kinds"]),
            blocks={k: slice(a, b) for k, (a, b) in data["blocks"].items()},
            state_parts={k: slice(a, b) for k, (a, b) in data["state_parts"].items()},
            augment=bool(data["augment"]),
            hardware_weights=data["hardware_weights"],
        )

    def _distance_spans(self, dist: np.ndarray) -> list[tuple[int, int]] | None:
        """Diagonal blocks holding every finite off-diagonal distance, or ``None`` when the
        matrix is not symmetric with a zero diagonal (it must then be stored dense)."""
        n = len(self)
        if np.any(np.diagonal(dist) != 0) or not np.array_equal(dist, dist.T):
            return None
        spans = sorted((s.start, s.stop) for s in self.blocks.values())
        tiled = (
            bool(spans)
            and spans[0][0] == 0
            and spans[-1][1] == n
            and all(a <= b for a, b in spans)
            and all(spans[k][1] == spans[k + 1][0] for k in range(len(spans) - 1))
        )
        if tiled and all(np.isinf(dist[a:b, b:]).all() for a, b in spans):
            return spans
        return [(0, n)]

    def plot_heatmap(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        title: str | None = None,
        cmap: str = "viridis",
        max_labels: int = 40,
        figsize: tuple[float, float] | None = None,
        dpi: int = 100,
    ) -> Figure:
        """Heatmap of the distance matrix with labelled axes and a colorbar (§3.1).

        Drawn on a standalone Agg figure (no pyplot, no global backend change); vertex names
        label the axes when there are at most ``max_labels``; pairs without an edge are grey.

        Args:
            path: file to save (format from its suffix, e.g. ``.png``); ``None`` saves nothing.
            title: figure title (default: level and metric).
            cmap: matplotlib colormap name.
            max_labels: largest ``n`` for which tick labels are drawn.
            figsize: inches; default grows with ``n``.
            dpi: resolution of the saved file.

        Returns:
            The ``matplotlib.figure.Figure``.

        Example:
            >>> g = redundancy_graph(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)))
            >>> g.plot_heatmap(None).axes[0].get_xlabel()
            'operator'
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = len(self)
        side = min(12.0, 4.0 + 0.18 * n)
        fig = Figure(figsize=figsize or (side + 1.5, side), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        data = np.ma.masked_invalid(self._numpy_distance())
        cm = _colormap(cmap)
        image = ax.imshow(data, cmap=cm, interpolation="nearest")
        cbar = fig.colorbar(image, ax=ax)
        cbar.set_label(_METRIC_NAMES[self.metric])
        unit = {"layer": "operator", "channel": "channel", "head": "head"}[self.level]
        ax.set_xlabel(unit)
        ax.set_ylabel(unit)
        if n <= max_labels:
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_xticklabels(self.names, rotation=90, fontsize=7)
            ax.set_yticklabels(self.names, fontsize=7)
        ax.set_title(title if title is not None else f"QM-FRG, {self.level} level ({self.metric})")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig

    # -- report -----------------------------------------------------------------------------

    def vertex_summary(self) -> list[dict[str, Any]]:
        """Per vertex: spectral entropy, effective rank and nearest sibling (§2.1, §3.1).

        With ``p_j = ψ_j²`` (the eigenvalues ``σ_j² / Σσ²`` of the operator's density matrix
        ``ρ = ŴŴᵀ / tr ŴŴᵀ``), the spectral entropy is the von Neumann entropy
        ``S = −Σ_j p_j ln p_j`` (nats) and the effective rank is ``e^S``, between 1 (one
        singular value) and the number of singular values (a flat spectrum). The nearest
        sibling is the closest vertex joined by an edge (``None`` when there is none). For
        heads, ``states`` holds two parts and every statistic is given per part
        (``spectral_entropy_qk``, ``effective_rank_vo``, ...).

        Returns:
            One dict per vertex, in vertex order: ``name``, ``kind``, ``block`` (channel / head
            level), ``spectral_entropy``, ``effective_rank``, ``state`` (leading entries of ψ,
            at most 8), ``nearest`` and ``nearest_distance``.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
            >>> _ = net[2].load_state_dict(net[0].state_dict())
            >>> row = redundancy_graph(net).vertex_summary()[0]
            >>> row["nearest"], row["nearest_distance"], 1 <= row["effective_rank"] <= 5
            ('2', 0.0, True)
        """
        states = self.states.detach().cpu().double()
        parts = self.state_parts or {"": slice(0, states.shape[1])}
        stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for part, sl in parts.items():
            p = states[:, sl] ** 2
            p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-300)
            entropy = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(dim=1)
            entropy = entropy.clamp_min(0.0).numpy()
            stats[part] = entropy, np.exp(entropy)
        dist = self._numpy_distance()
        block_of = self._block_of()
        rows = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {"name": name, "kind": self.kinds[i]}
            if self.blocks:
                row["block"] = block_of.get(i)
            for part, (entropy, rank) in stats.items():
                suffix = f"_{part}" if part else ""
                row[f"spectral_entropy{suffix}"] = float(entropy[i])
                row[f"effective_rank{suffix}"] = float(rank[i])
            if not self.state_parts:
                psi = states[i]
                row["state"] = [float(v) for v in psi[: min(8, int((psi != 0).sum()) or 1)]]
            others = dist[i].copy()  # row by row: no second n x n matrix at channel level
            others[i] = np.inf
            j = int(np.argmin(others))
            finite = math.isfinite(others[j])
            row["nearest"] = self.names[j] if finite else None
            row["nearest_distance"] = float(others[j]) if finite else None
            rows.append(row)
        return rows

    def layer_summary(
        self, clusters: Sequence[Sequence[int]] | None = None
    ) -> list[dict[str, Any]]:
        """The report's table of layers: one row per vertex at layer level, per block otherwise.

        At layer level the rows are :meth:`vertex_summary` plus, with ``clusters``, the rank
        of the vertex's cluster (1 = most redundant) as ``cluster``. At channel and head level
        each layer / attention module is summarized: ``vertices``, the mean spectral entropy
        and effective rank of its channels or heads, the smallest and median nearest-sibling
        distance and, with ``clusters``, how many of its vertices sit in clusters of two or more
        (``redundant``: merge candidates).

        Args:
            clusters: output of :meth:`cluster` (ranked), or ``None``.

        Returns:
            A list of JSON-ready dicts (``None`` for undefined distances).

        Example:
            >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
            >>> g = redundancy_graph(net, level="channel")
            >>> [(row["name"], row["vertices"]) for row in g.layer_summary()]
            [('0', 4), ('1', 4)]
        """
        vertices = self.vertex_summary()
        cluster_of: dict[int, int] = {}
        for rank, members in enumerate(clusters or ()):
            for i in members:
                cluster_of[_check_index(i, len(self), f"clusters[{rank}]")] = rank
        if not self.blocks:
            for i, row in enumerate(vertices):
                if clusters is not None:
                    row["cluster"] = cluster_of[i] + 1 if i in cluster_of else None
            return vertices
        sizes = {rank: len(members) for rank, members in enumerate(clusters or ())}
        stat_keys = [k for k in vertices[0] if k.startswith(("spectral_entropy", "effective_rank"))]
        rows = []
        for name, sl in self.blocks.items():
            idx = list(range(len(self)))[sl]
            members = [vertices[i] for i in idx]
            row: dict[str, Any] = {"name": name, "kind": self.kinds[idx[0]] if idx else None,
                                   "vertices": len(idx)}
            for key in stat_keys:
                row[f"mean_{key}"] = float(np.mean([m[key] for m in members])) if idx else None
            near = [m["nearest_distance"] for m in members if m["nearest_distance"] is not None]
            row["min_nearest_distance"] = float(min(near)) if near else None
            row["median_nearest_distance"] = float(np.median(near)) if near else None
            if clusters is not None:
                row["redundant"] = sum(1 for i in idx if sizes.get(cluster_of.get(i, -1), 0) > 1)
            rows.append(row)
        return rows

    def to_html(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        clusters: Sequence[Sequence[int]] | None = None,
        title: str | None = None,
        top: int = 10,
        max_clusters: int = 50,
        heatmap_png: bytes | None = None,
    ) -> str:
        """A self-contained HTML report of the graph (§3.1, §3.4); written to ``path`` if given.

        One file, no external resources: the table of layers (:meth:`layer_summary`: spectral
        entropy, effective rank, nearest-sibling distance), the clusters ranked by redundancy
        (mean intra-cluster distance, medoid, members), the ``top`` most redundant pairs and
        the heatmap (:meth:`plot_heatmap`) embedded as a base64 PNG.

        Args:
            path: file to write (UTF-8); ``None`` only returns the text.
            clusters: output of :meth:`cluster`; default ``self.cluster()``.
            title: page title (default: level and metric).
            top: number of most redundant pairs listed.
            max_clusters: clusters listed in full (the rest are counted).
            heatmap_png: PNG bytes of an already drawn heatmap (default: drawn here).

        Returns:
            The HTML text.

        Example:
            >>> g = redundancy_graph(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)))
            >>> text = g.to_html(clusters=[[0], [1]])
            >>> "<table" in text and 'src="data:image/png;base64,' in text
            True
        """
        if isinstance(max_clusters, bool) or not isinstance(max_clusters, int) or max_clusters < 0:
            raise ValueError(f"max_clusters must be a non-negative int, got {max_clusters!r}")
        pairs = self.most_redundant_pairs(top)
        if clusters is None:
            clusters = self.cluster()
        clusters = [list(c) for c in clusters]
        rows = self.layer_summary(clusters)
        reps = self.representatives(clusters) if clusters else []
        if heatmap_png is None:
            buffer = io.BytesIO()
            self.plot_heatmap(None).savefig(buffer, format="png")
            heatmap_png = buffer.getvalue()
        image = base64.b64encode(heatmap_png).decode("ascii")
        title = title or f"QM-FRG, {self.level} level ({_METRIC_NAMES[self.metric]})"
        dist = self._numpy_distance()
        esc = html.escape

        def cell(value: Any) -> str:
            num = isinstance(value, (int, float))
            return ('<td class="num">' if num else "<td>") + esc(summary_text(value)) + "</td>"

        columns = [k for k in rows[0] if k != "block"] if rows else []
        layer_rows = "\n".join(
            "<tr>" + "".join(cell(row[k]) for k in columns) + "</tr>" for row in rows
        )
        headers = "".join(f"<th>{esc(_COLUMN_NAMES.get(k, k.replace('_', ' ')))}</th>"
                          for k in columns)
        multi = [c for c in clusters if len(c) > 1]
        cluster_rows = []
        for rank, (members, rep) in enumerate(zip(clusters, reps)):
            if rank >= max_clusters or len(members) < 2:
                break
            sub = dist[np.ix_(members, members)][np.triu_indices(len(members), 1)]
            names = [self.names[i] for i in members]
            shown = ", ".join(names[:12]) + (f", … (+{len(names) - 12})" if len(names) > 12 else "")
            cluster_rows.append(
                f"<tr>{cell(rank + 1)}{cell(len(members))}{cell(float(sub.mean()))}"
                f"{cell(self.names[rep])}{cell(shown)}</tr>"
            )
        listed = len(cluster_rows)
        note = (f"{len(clusters)} cluster{'s' if len(clusters) != 1 else ''}: {len(multi)} "
                f"with two or more members (merge candidates), {len(clusters) - len(multi)} "
                f"singleton{'s' if len(clusters) - len(multi) != 1 else ''}.")
        if listed < len(multi):
            note += f" The {listed} most redundant are listed."
        pair_rows = "\n".join(f"<tr>{cell(a)}{cell(b)}{cell(d)}</tr>" for a, b, d in pairs)
        unit = {"layer": "operators", "channel": "channels", "head": "heads"}[self.level]
        size = f"{len(self)} {unit}"
        if self.blocks:
            owner = "layers" if self.level == "channel" else "attention modules"
            size += f" in {len(self.blocks)} {owner}"
        text = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 80em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f2f2f2; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; height: auto; }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p>{esc(size)}.
Distance: {esc(_METRIC_NAMES[self.metric])}; bias-augmented states: {self.augment}.
Spectral entropy S = −Σ p ln p of p = ψ² (the density matrix's eigenvalues, nats);
effective rank e<sup>S</sup>; nearest sibling: closest vertex joined by an edge.</p>
<h2 id="layers">Layers</h2>
<table class="layers">
<thead><tr>{headers}</tr></thead>
<tbody>
{layer_rows}
</tbody>
</table>
<h2 id="clusters">Redundancy clusters, most redundant first</h2>
<p>{esc(note)}</p>
<table class="clusters">
<thead><tr><th>rank</th><th>size</th><th>mean distance</th><th>representative (medoid)</th>
<th>members</th></tr></thead>
<tbody>
{chr(10).join(cluster_rows)}
</tbody>
</table>
<h2 id="pairs">Most redundant pairs</h2>
<table class="pairs">
<thead><tr><th>a</th><th>b</th><th>distance</th></tr></thead>
<tbody>
{pair_rows}
</tbody>
</table>
<h2 id="heatmap">Heatmap</h2>
<img alt="QM-FRG distance heatmap" src="data:image/png;base64,{image}">
</body>
</html>
"""
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    # -- helpers ----------------------------------------------------------------------------

    def _numpy_distance(self) -> np.ndarray:
        return self.distance.detach().cpu().double().numpy()

    def _block_of(self) -> dict[int, str]:
        return {i: name for name, sl in self.blocks.items() for i in range(len(self))[sl]}


def _json_floats(values: np.ndarray, precision: str) -> list[Any]:
    """``values`` as (nested) lists of floats for JSON, non-finite as ``None``;
    ``"float32"``: the shortest decimals that read back as the same float32."""
    values = np.asarray(values, dtype=np.float64)
    if precision == "float32":
        with np.errstate(over="ignore"):
            values = values.astype(np.float32).astype(str).astype(np.float64)
    if np.isfinite(values).all():
        return values.tolist()
    return np.where(np.isfinite(values), values, None).tolist()


def _from_json_floats(values: Any) -> np.ndarray:
    """Inverse of :func:`_json_floats` (``None`` -> ``inf``), as a float64 array."""
    arr = np.array(values, dtype=np.float64)  # None -> nan (JSON has no nan to confuse it)
    arr[np.isnan(arr)] = np.inf
    return arr


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="lightgrey")


# ---------------------------------------------------------------------------------------------
# clustering helpers
# ---------------------------------------------------------------------------------------------


def _check_choice(value: object, choices: tuple[str, ...], name: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_k(k: object, name: str) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a positive int or None, got {k!r}")
    return int(k)


def _check_index(i: object, n: int, where: str) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
        raise ValueError(f"{where} holds {i!r}; expected a vertex index in [0, {n})")
    return int(i)


def _bandwidth(dist: np.ndarray, bandwidth: str | float) -> float:
    """σ of the Gaussian affinity (see :meth:`RedundancyGraph.cluster`)."""
    if not isinstance(bandwidth, str):
        return float(bandwidth)
    n = len(dist)
    off = dist[np.triu_indices(n, 1)]
    off = off[np.isfinite(off)]
    positive = off[off > 0]
    if not positive.size:
        return 1.0  # every finite distance is 0: any σ gives affinity 1
    if bandwidth == "median":
        sigma = float(np.median(off))
        return sigma if sigma > 0 else float(positive.mean())
    masked = np.where(np.eye(n, dtype=bool), np.inf, dist)
    nearest = masked.min(axis=1)
    nearest = nearest[np.isfinite(nearest)]
    floor = 1e-3 * float(np.median(positive))
    return max(float(np.median(nearest)), floor)


def _affinity(dist: np.ndarray, bandwidth: str | float = "nearest") -> np.ndarray:
    """A = exp(−d² / (2σ²)); ``inf`` distances give 0 (§3.4)."""
    sigma = _bandwidth(dist, bandwidth)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        aff = np.exp(-(dist**2) / (2 * sigma**2))
    # An affinity below 1e-12 carries no information, and tiny (denormal) degrees blow up the
    # normalized Laplacian's D^{-1/2} (the spectral embedding then overflows): cut them to 0.
    return np.where(np.isfinite(dist) & (aff >= 1e-12), aff, 0.0)


def _eigengap(aff: np.ndarray) -> int:
    """k = argmax_{1 ≤ k < n} (λ_{k+1} − λ_k) of the normalized Laplacian, at least the number
    of connected components (zero eigenvalues)."""
    n = len(aff)
    if n <= 1:
        return 1
    a = aff.copy()
    np.fill_diagonal(a, 0.0)
    deg = a.sum(axis=1)
    isolated = deg <= 0
    inv = np.where(isolated, 0.0, 1.0 / np.sqrt(np.where(isolated, 1.0, deg)))
    lap = np.diag((~isolated).astype(float)) - inv[:, None] * a * inv[None, :]
    eig = np.linalg.eigvalsh((lap + lap.T) / 2)
    components = int(np.sum(eig < 1e-10))
    return max(int(np.argmax(eig[1:] - eig[:-1])) + 1, components)


def _cluster_matrix(
    dist: np.ndarray,
    k: int | None,
    threshold: float | None,
    random_state: int | None,
    bandwidth: str | float = "nearest",
) -> list[list[int]]:
    n = len(dist)
    if n == 0:
        return []
    if n == 1:
        return [[0]]
    if threshold is not None:
        from sklearn.cluster import AgglomerativeClustering

        finite = dist[np.isfinite(dist)]
        big = (float(finite.max()) if finite.size else 0.0) * 4 + 4 * threshold + 1
        labels = AgglomerativeClustering(
            n_clusters=None,
            metric="precomputed",
            linkage="complete",
            distance_threshold=threshold,
        ).fit_predict(np.where(np.isfinite(dist), dist, big))
        return _groups(labels)
    aff = _affinity(dist, bandwidth)
    if k is None:
        k = _eigengap(aff)
    # Exact duplicates (distance 0) are one operator: they share an affinity row, but the
    # Laplacian still has an eigenvector e_i − e_j splitting them, so cluster one copy each.
    from scipy.sparse.csgraph import connected_components

    _, twin = connected_components(dist == 0, directed=False)
    copies = _groups(twin)
    reps = [c[0] for c in copies]
    k = min(k, len(reps))
    if k == 1:
        return [list(range(n))]
    if k == len(reps):
        return copies
    # a copy with no edge to any other copy is a cluster of its own (nothing it can merge with
    # at this bandwidth); spectral clustering runs on the linked rest with what k leaves (at
    # least one cluster, so more than k come back when k < isolated copies + 1)
    sub = aff[np.ix_(reps, reps)]
    linked = (sub - np.diag(np.diag(sub))).max(axis=1) > 0
    rest = np.flatnonzero(linked).tolist()
    alone = [copies[r] for r in np.flatnonzero(~linked).tolist()]
    if not rest:
        return alone
    k_rest = max(1, min(k - len(alone), len(rest)))
    if k_rest == 1:
        found = [[i for r in rest for i in copies[r]]]
    elif k_rest == len(rest):
        found = [copies[r] for r in rest]
    else:
        labels = _spectral_labels(sub[np.ix_(rest, rest)], k_rest, random_state)
        found = [[i for j in group for i in copies[rest[j]]] for group in _groups(labels)]
    return found + alone


def summary_text(value: Any) -> str:
    """One cell of a layer / vertex summary as text (the HTML and Markdown reports share it):
    ``None`` → "–", floats to 4 significant digits, lists of floats to 3 decimals."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(f"{v:.3f}" for v in value)
    return str(value)


def _spectral_labels(aff: np.ndarray, k: int, random_state: int | None) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(
            n_clusters=k,
            affinity="precomputed",
            random_state=random_state,
            # many clusters: sklearn's lobpcg path takes a dense eigh (ARPACK crawls there),
            # and QR-based label assignment replaces k-means with hundreds of centres
            eigen_solver="lobpcg" if len(aff) < 5 * k + 1 else "arpack",
            assign_labels="kmeans" if k <= _KMEANS_MAX_K else "cluster_qr",
        ).fit_predict(aff)
    return labels


def _groups(labels: np.ndarray) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        out.setdefault(label, []).append(i)
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# building the graph
# ---------------------------------------------------------------------------------------------


def _e1(length: int, dtype: torch.dtype) -> Tensor:
    out = torch.zeros(length, dtype=dtype)
    out[0] = 1.0
    return out


def _safe_states(mats: Tensor, dtype: torch.dtype) -> Tensor:
    """``spectral_states(mats, augment=False)``; all-zero items get e₁ (the state the paper's
    augmentation gives a zero operator), so masked / dead operators stay defined."""
    b, m, n = mats.shape
    out = _e1(min(m, n), dtype).expand(b, -1).clone()
    alive = (mats != 0).flatten(1).any(dim=1).cpu()
    if bool(alive.any()):
        out[alive] = spectral_states(mats[alive.to(mats.device)], augment=False, dtype=dtype).cpu()
    return out


def _pairwise(states: Tensor, metric: str) -> Tensor:
    if len(states) == 0:
        return torch.zeros(0, 0, dtype=states.dtype)
    if metric == "fs":
        dist = pairwise_fubini_study(states)
    else:
        dist = pairwise_wasserstein2(states, kind="profile")
    dist = ((dist + dist.T) / 2).to(states.dtype)
    return dist.fill_diagonal_(0.0)


def _stack(states: list[Tensor]) -> Tensor:
    return torch.cat(pad_states(*states), dim=0) if states else torch.zeros(0, 1)


def _hardware_weights(
    weights: Mapping[str, float] | None, kinds: Sequence[str]
) -> dict[str, float] | None:
    if weights is None:
        return None
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"hardware_weights must be a mapping kind -> cost, got {type(weights).__name__}"
        )
    known = set(BUILTIN_KINDS) | set(kinds)
    out = {}
    for key, value in weights.items():
        if key not in known:
            raise ValueError(
                f"hardware_weights has unknown operator kind {key!r}; expected some of "
                f"{sorted(known)}"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 0)
        ):
            raise ValueError(f"hardware_weights[{key!r}] must be a finite cost >= 0, got {value!r}")
        out[key] = float(value)
    return out


def _kind_scale(kinds: Sequence[str], weights: dict[str, float] | None) -> Tensor | None:
    """Eq. (9) with one operator type per vertex: d_ij -> sqrt((c_i + c_j) / 2)·d_ij."""
    if not weights:
        return None
    c = torch.tensor([weights.get(k, 1.0) for k in kinds], dtype=torch.float64)
    return torch.sqrt((c[:, None] + c[None, :]) / 2)


def _layer_level(
    model: nn.Module, metric: str, augment: bool, module_filter: Any, dtype: torch.dtype
) -> tuple[list[str], list[str], Tensor, Tensor, dict, dict]:
    names, kinds, states = [], [], []
    for name, module in _walk(model, module_filter, strict=True):
        for view in operator_views(module, name):
            matrix, bias = view.layer_matrix(), view.layer_bias()
            if augment:
                psi = spectral_state(matrix, bias, augment=True, dtype=dtype).cpu()
            else:
                psi = _safe_states(matrix.unsqueeze(0), dtype)[0]
            names.append(view.name)
            kinds.append(view.kind)
            states.append(psi.unsqueeze(0))
    stacked = _stack(states).to(dtype)
    return names, kinds, stacked, _pairwise(stacked, metric), {}, {}


def _channel_level(
    model: nn.Module, metric: str, augment: bool, module_filter: Any, dtype: torch.dtype
) -> tuple[list[str], list[str], Tensor, Tensor, dict, dict]:
    names: list[str] = []
    kinds: list[str] = []
    blocks: dict[str, slice] = {}
    per_layer: list[Tensor] = []
    for name, module in model.named_modules():
        if not isinstance(module, _CHANNEL_TYPES):
            continue
        if module_filter is not None and not module_filter(name, module):
            continue
        name = name or type(module).__name__
        mats = channel_matrices(module)
        c, p, q = mats.shape
        bias = getattr(module, "bias", None)
        is_linear = isinstance(module, nn.Linear)
        if is_linear and (bias is None or not augment or not bool((bias != 0).any())):
            warnings.warn(
                f"channel-level states of Linear rows without a non-zero bias (or with "
                f"augment=False) are all e₁ (a row has one singular value): every pair of "
                f"channels of {name!r} is at distance 0",
                UserWarning,
                stacklevel=3,
            )
        if augment:
            # y_i = <W_i, X> + b_i = <diag(W_i, b_i), diag(X, 1)>: the functional analog of
            # the paper's [[W, b], [0, 1]] (§2.1); spectrum σ(W_i) ∪ {|b_i|}.
            aug = mats.new_zeros(c, p + 1, q + 1)
            aug[:, :p, :q] = mats
            if bias is not None:
                aug[:, p, q] = bias.detach()
            mats = aug
        blocks[name] = slice(len(names), len(names) + c)
        names.extend(f"{name}[{i}]" for i in range(c))
        kinds.extend(["linear" if is_linear else "conv"] * c)
        per_layer.append(_safe_states(mats, dtype))
    padded = pad_states(*per_layer)
    states = torch.cat(padded, dim=0).to(dtype) if padded else torch.zeros(0, 1, dtype=dtype)
    dist = torch.full((len(names), len(names)), math.inf, dtype=dtype)
    for sl, block in zip(blocks.values(), padded):
        dist[sl, sl] = _pairwise(block.to(dtype), metric)
    return names, kinds, states, dist, blocks, {}


def _head_level(
    model: nn.Module,
    metric: str,
    augment: bool,
    module_filter: Any,
    dtype: torch.dtype,
    weights: dict[str, float] | None,
) -> tuple[list[str], list[str], Tensor, Tensor, dict, dict]:
    names: list[str] = []
    blocks: dict[str, slice] = {}
    qk_states: list[Tensor] = []
    vo_states: list[Tensor] = []
    for name, module in _walk(model, module_filter, strict=False):
        views = {v.kind: v for v in operator_views(module, "") if v.is_batch}
        if not all(k in views for k in HEAD_KINDS):
            continue
        qk, vo = views["head-qk"], views["head-vo"]
        heads = qk.matrix.shape[0]
        if vo.matrix.shape[0] != heads:
            raise ValueError(
                f"{name!r}: head-qk has {heads} heads but head-vo has {vo.matrix.shape[0]}"
            )
        name = name or type(module).__name__
        blocks[name] = slice(len(names), len(names) + heads)
        names.extend(f"{name}.head{h}" for h in range(heads))
        if augment:
            qk_states.append(spectral_states(qk.matrix, None, augment=True, dtype=dtype).cpu())
            vo_states.append(spectral_states(vo.matrix, vo.bias, augment=True, dtype=dtype).cpu())
        else:
            qk_states.append(_safe_states(qk.matrix, dtype))
            vo_states.append(_safe_states(vo.matrix, dtype))
    qk_all, vo_all = _stack(qk_states).to(dtype), _stack(vo_states).to(dtype)
    weights = weights or {}
    # Eq. (9): d = sqrt(c_qk·d_qk² + c_vo·d_vo²), costs default to 1.
    sq = weights.get("head-qk", 1.0) * _pairwise(qk_all, metric) ** 2
    sq = sq + weights.get("head-vo", 1.0) * _pairwise(vo_all, metric) ** 2
    dq, dv = qk_all.shape[1], vo_all.shape[1]
    states = torch.cat([qk_all, vo_all], dim=1)
    parts = {"qk": slice(0, dq), "vo": slice(dq, dq + dv)}
    return names, ["head"] * len(names), states, torch.sqrt(sq), blocks, parts


def redundancy_graph(
    model: nn.Module,
    level: str = "layer",
    metric: str = "fs",
    augment: bool = True,
    module_filter: Callable[[str, nn.Module], bool] | None = None,
    hardware_weights: Mapping[str, float] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> RedundancyGraph:
    """Build the QM-FRG of a model (§3.1): vertices = operators, edges = spectral distances.

    Levels:

    - ``"layer"``: every supported operator of :func:`~torch_qmprune.operators.layer_matrices`
      (attention modules give ``.qk`` = Σ_h W_Q_hᵀW_K_h and ``.vo`` = Σ_h W_O_h W_V_h); state
      of the bias-augmented matrix (§2.1), padded across shapes (§2.2); complete graph.
    - ``"channel"``: output channels of every Linear / ConvNd / ConvTransposeNd layer, filter
      ``i`` as its ``C_in x ∏k`` matrix. Edges only between siblings of one layer (``blocks``;
      other pairs are ``inf``). A channel is an affine *functional* ``⟨W_i, X⟩ + b_i``, so
      ``augment`` uses ``diag(W_i, b_i)`` (spectrum ``σ(W_i) ∪ {|b_i|}``) rather than
      ``[[W, b], [0, 1]]``, which needs a bias per row. A Linear row has one singular value:
      its channel-level state is ``(‖w_i‖, |b_i|)`` normalized, i.e. it carries only the
      ratio ``|b_i| / ‖w_i‖`` (all e₁ without a non-zero bias, with a warning; SCIENCE.md §2).
    - ``"head"``: heads of every attention module (``nn.MultiheadAttention``, BERT-style, or
      registered head handlers), ``blocks`` per module; distances between all heads (heads of
      different modules share ``d_model`` and are comparable):
      ``d = sqrt(c_qk·d(ψ_qk)² + c_vo·d(ψ_vo)²)``, Eq. (9) over the two parts (``c = 1``
      unless ``hardware_weights`` sets ``"head-qk"`` / ``"head-vo"``).

    All-zero operators (masked channels with ``augment=False``) get the state e₁, the state
    the paper's augmentation gives a zero operator. Math runs in ``dtype`` (float64 default:
    near-duplicates are resolved to ~1e-8 rad); the graph lives on the CPU. Cost is O(n²)
    memory in the number of vertices.

    Args:
        model: the network.
        level: ``"layer"``, ``"channel"`` or ``"head"``.
        metric: ``"fs"`` (Fubini–Study, §2.3) or ``"w2"`` (2-Wasserstein distance of the
            majorization profiles, Theorem 2.1).
        augment: use bias-augmented states (§2.1).
        module_filter: ``(name, module) -> bool`` choosing the modules that become vertices.
        hardware_weights: Eq. (9) instruction costs ``c_m`` keyed by operator kind
            (``"conv"``, ``"linear"``, ``"embedding"``, ``"head-qk"``, ``"head-vo"``, ...).
            At layer / channel level each vertex has one kind and ``d_ij`` becomes
            ``sqrt((c_i + c_j) / 2)·d_ij``: Eq. (9) with half of ``d²`` charged at each end's
            cost (``sqrt(c)·d`` for two operators of one kind). Kinds not listed cost 1.
        dtype: ``torch.float64`` (default) or ``torch.float32``.

    Returns:
        A :class:`RedundancyGraph`.

    Raises:
        ValueError: bad ``level`` / ``metric`` / weights, or no vertex found.
        UnsupportedModuleError: at layer level, a parameterized leaf without a handler (skip
            it with ``module_filter`` or register it).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
        >>> _ = net[2].load_state_dict(net[1].state_dict())  # layers 1 and 2 identical
        >>> g = redundancy_graph(net, level="layer")
        >>> g.names, float(g.distance[1, 2])
        (['0', '1', '2'], 0.0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_choice(level, LEVELS, "level")
    _check_choice(metric, METRICS, "metric")
    if not isinstance(augment, bool):
        raise TypeError(f"augment must be a bool, got {augment!r}")
    if module_filter is not None and not callable(module_filter):
        raise TypeError(
            f"module_filter must be a callable (name, module) -> bool, got "
            f"{type(module_filter).__name__}"
        )
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if level == "layer":
        built = _layer_level(model, metric, augment, module_filter, dtype)
    elif level == "channel":
        built = _channel_level(model, metric, augment, module_filter, dtype)
    else:
        built = _head_level(
            model,
            metric,
            augment,
            module_filter,
            dtype,
            _hardware_weights(hardware_weights, HEAD_KINDS),
        )
    names, kinds, states, dist, blocks, parts = built
    if not names:
        what = {
            "layer": "supported operators",
            "channel": "Linear/Conv layers",
            "head": "attention modules",
        }[level]
        raise ValueError(f"no {what} found in {type(model).__name__} for level={level!r}")
    weights = _hardware_weights(hardware_weights, kinds)
    if level != "head":
        scale = _kind_scale(kinds, weights)
        if scale is not None:
            dist = torch.where(torch.isfinite(dist), dist * scale.to(dist.dtype), dist)
    return RedundancyGraph(
        names=names,
        distance=dist,
        states=states,
        level=level,
        metric=metric,
        kinds=kinds,
        blocks=blocks,
        state_parts=parts,
        augment=augment,
        hardware_weights=weights,
    )
