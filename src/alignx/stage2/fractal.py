"""The fractal calibrator: how a prompt's feature sits in each axis's feature cloud, at granularity ε.

For each axis a with latent bank Z_a (N_a points) — METHOD.md section 3.2, all [ours] unless marked:

* fraction-matched radius: k_a = max(3, ⌈0.01·N_a⌉) and r_a = the median over the bank of each point's
  distance to its k_a-th neighbour, so clouds of different sizes are compared at the same *fraction*;
* soft correlation integral in the log domain, at granularity ε = 0.05 [paper]:
  log C_a(z) = logsumexp_j log σ((r_a − ‖z − z_j‖)/(ε·r_a)) − log N_a
  (a sigmoid instead of the hard step of Grassberger–Procaccia, so the score is smooth in z);
* conformal typicality: u_a(z) = (1 + #{j : s_j ≤ log C_a(z)}) / (N_a + 1) ∈ (0, 1], where s_j are the bank's
  own leave-one-out values — a rank, hence comparable across axes whatever their density;
* optional local-dimension term (Levina–Bickel MLE, m = 20): u_a ← u_a·exp(−β·|D̂_a(z) − D̄_a|/D̄_a);
* q^frac = u / Σ u, and the out-of-distribution gate max_a u_a(z) < α.

Every distance is computed with batched matrix products (``torch.cdist`` in matmul mode), in chunks, so a
query against a 20,000-point bank costs one [Q, N] product and no Python loop over points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

_CHUNK = 1024  # query rows per distance block: bounds memory at CHUNK × N floats
BANK_DTYPES = {"float16": torch.float16, "float32": torch.float32}
FLOAT16_TOLERANCE = 1e-2  # largest change of log C on the bank's own points that float16 storage may cause


def pairwise_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [Q, N] by matrix products (the fast path for many points), in float64.

    The matrix-product form ‖a‖² + ‖b‖² − 2a·b cancels catastrophically in float32 once neighbour
    distances are small next to the norms (nearest-neighbour distances would be noise); float64 keeps
    them exact for the price of a slower but still tiny product.
    """
    return torch.cdist(queries.double(), bank.double(), compute_mode="use_mm_for_euclid_dist")


def distance_blocks(queries: torch.Tensor, bank: torch.Tensor, *, exclude_self: bool):
    """Exact distances from ``queries`` to ``bank`` in blocks of rows; with ``exclude_self`` the queries
    are the bank itself (same order) and each point's distance to itself is +inf."""
    for start in range(0, len(queries), _CHUNK):
        block = pairwise_distances(queries[start : start + _CHUNK], bank)
        if exclude_self:
            block[torch.arange(len(block)), torch.arange(start, start + len(block))] = math.inf
        yield block


def kth_neighbour_distances(points: torch.Tensor, k: int, *, exclude_self: bool) -> torch.Tensor:
    """Distances [N, k] from each point to its k nearest bank points (itself excluded when asked)."""
    return torch.cat([b.topk(k, dim=1, largest=False).values for b in distance_blocks(points, points, exclude_self=exclude_self)])


def soft_log_count(distances: torch.Tensor, radius: float, epsilon: float, bank_size: int) -> torch.Tensor:
    """log C = logsumexp_j log σ((r − d_j)/(ε r)) − log N over the last dimension."""
    return torch.logsumexp(F.logsigmoid((radius - distances) / (epsilon * radius)), dim=-1) - math.log(bank_size)


def levina_bickel_dimension(neighbour_distances: torch.Tensor) -> torch.Tensor:
    """Local intrinsic dimension from sorted distances T_1..T_m to the m nearest neighbours.

    D̂ = [ (1/(m−1)) Σ_{j<m} log(T_m / T_j) ]⁻¹ (Levina & Bickel, 2004). Rows [.., m] → [..].
    """
    distances = neighbour_distances.clamp_min(1e-12)
    logs = torch.log(distances[..., -1:] / distances[..., :-1])
    return 1.0 / logs.mean(dim=-1).clamp_min(1e-12)


@dataclass
class AxisCloud:
    """What the calibrator keeps of one axis's latent bank.

    Queries, which must cost a few milliseconds against 20,000 points, use the bank *centred on its mean*,
    with its squared norms precomputed: one [Q, k]×[k, N] product per axis in float32, and centring keeps
    the norms at the scale of the cloud's spread, so the ‖a‖² + ‖b‖² − 2a·b form loses nothing that matters
    at these distances. That query form is all a saved calibrator holds.

    It can be stored in float16 instead (``stage2.bank_dtype``), which halves the largest thing AlignX adds
    at inference and costs a cast of the bank to float32 per query block (measured: 2.9 → 8.6 ms to route
    one prompt against 3 × 20,000 points). Rounding moves a point by up to 2⁻¹¹ of its norm, which matters
    only next to the soft count's width ε·r_a: in 256-d feature clouds neighbour radii are of the order of
    the cloud's spread and it does not (on the demo run's banks it moved log C by at most 7e-4 and the
    fractal distribution by at most 1e-3, one conformal rank, never its argmax), but in a low-dimensional
    cloud with tight radii it can. So float16 is a request: :meth:`from_points` measures log C on the
    bank's own points both ways and keeps float32 when float16 would move it by more than
    ``FLOAT16_TOLERANCE``.

    Fitting (neighbour radii, leave-one-out scores) uses exact float64 distances once, and the fitted
    calibrator keeps the float64 bank in ``exact`` for the one thing that needs it afterwards: scoring the
    bank's own points leave-one-out (Stage 2 training). A loaded calibrator does without it: for 3 axes of
    20,000 points × 256 it would hold 184 MB instead of 61 MB.
    """

    centred: torch.Tensor  # [N, k] float32 or float16: the bank minus its mean
    centre: torch.Tensor  # [k] float64: the bank's mean
    radius: float  # r_a
    epsilon: float  # ε_a
    loo_scores: torch.Tensor  # sorted leave-one-out log C_a of the bank's own points, [N]
    mean_dimension: float  # D̄_a
    exact: torch.Tensor | None = None  # [N, k] float64 bank, kept after fitting (see pairwise_distances)

    @classmethod
    def from_points(cls, points: torch.Tensor, radius: float, epsilon: float, loo_scores: torch.Tensor,
                    mean_dimension: float, *, keep_exact: bool = True, bank_dtype: str = "float32") -> "AxisCloud":
        """The cloud of ``points``, stored in ``bank_dtype`` where that is exact enough (see the class docstring)."""
        if bank_dtype not in BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {bank_dtype!r}")
        points = points.double()
        centre = points.mean(0)
        cloud = cls((points - centre).float(), centre, radius, epsilon, loo_scores, mean_dimension,
                    points if keep_exact else None)
        if bank_dtype == "float16":
            compact = replace(cloud, centred=cloud.centred.half())
            if float((cloud._probe() - compact._probe()).abs().max()) <= FLOAT16_TOLERANCE:
                return compact
        return cloud

    def _probe(self) -> torch.Tensor:
        """Leave-one-out log C of ~512 of the bank's own points through the query path (as stored)."""
        index = torch.arange(0, len(self), max(1, len(self) // 512))
        distances = self.query_distances(self.exact[index] if self.exact is not None else
                                         self.centred[index].double() + self.centre)
        distances[torch.arange(len(index)), index] = float("inf")  # leave each point itself out
        return soft_log_count(distances, self.radius, self.epsilon, len(self) - 1)

    def __post_init__(self) -> None:
        if self.centred.dtype not in BANK_DTYPES.values():
            raise ValueError(f"a bank is stored in float16 or float32, not {self.centred.dtype}")
        # Column-major: ``centred.T`` is a contiguous [k, N] matrix, the layout in which a query block's product
        # with the bank streams it once (row-major [N, k] read through ``.T`` measured 4× slower for one query
        # against 20,000 points on an AVX2 CPU: 4.3 against 1.0 ms).
        self.centred = self.centred.T.contiguous().T
        self.centre = self.centre.double()
        self._sq_norms = self.centred.float().square().sum(1)  # of the points as stored: consistent distances

    def __len__(self) -> int:
        return len(self.centred)

    def query_distances(self, z: torch.Tensor) -> torch.Tensor:
        """Distances [Q, N] from queries to the bank (fast float32 path)."""
        centred = (z.double() - self.centre).float()
        products = centred @ self.centred.float().T  # a float16 bank is cast for each query block
        squared = (centred * centred).sum(1, keepdim=True) + self._sq_norms - 2.0 * products
        return squared.clamp_min_(0.0).sqrt_()

    def log_correlation_integral(self, z: torch.Tensor) -> torch.Tensor:
        """log C_a(z) for queries that are not bank points."""
        out = [
            soft_log_count(self.query_distances(z[s : s + _CHUNK]), self.radius, self.epsilon, len(self))
            for s in range(0, len(z), _CHUNK)
        ]
        return torch.cat(out) if out else torch.empty(0)

    def leave_one_out_log_correlation_integral(self, bank_points: torch.Tensor) -> torch.Tensor:
        """log C_a of the bank's own points (in bank order), each without its own contribution, exactly."""
        if self.exact is None:
            raise ValueError("scoring a bank's own points leave-one-out needs the exact bank, which only a freshly "
                             "fitted calibrator keeps (a loaded one holds the query form alone)")
        return exact_log_correlation_integral(bank_points, self.exact, self.radius, self.epsilon, exclude_self=True)


class FractalCalibrator:
    """Geometry-aware calibration over the axes' latent clouds (see the module docstring)."""

    def __init__(
        self,
        clouds: list[AxisCloud],
        *,
        dimension_neighbours: int = 20,
        dimension_weight: float = 0.0,
    ):
        self.clouds = clouds
        self.dimension_neighbours = dimension_neighbours
        self.dimension_weight = dimension_weight

    # ---- fitting ------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        banks: list[torch.Tensor],
        *,
        epsilon: float = 0.05,
        epsilon_mode: str = "fixed",
        neighbour_fraction: float = 0.01,
        min_neighbours: int = 3,
        dimension_neighbours: int = 20,
        dimension_weight: float = 0.0,
        bank_dtype: str = "float32",
    ) -> "FractalCalibrator":
        clouds = []
        for bank in banks:
            bank = bank.double()
            n = len(bank)
            if n < max(min_neighbours, 3) + 2:
                raise ValueError(f"a feature cloud needs at least {max(min_neighbours, 3) + 2} points, got {n}")
            k = min(max(min_neighbours, math.ceil(neighbour_fraction * n)), n - 1)
            m = min(dimension_neighbours, n - 1)
            neighbours = kth_neighbour_distances(bank, max(k, m), exclude_self=True)
            radius = float(neighbours[:, k - 1].median())
            mean_dimension = float(levina_bickel_dimension(neighbours[:, :m]).mean())
            eps = epsilon if epsilon_mode == "fixed" else min(max(1.0 / mean_dimension, 0.03), 0.10)
            loo = exact_log_correlation_integral(bank, bank, radius, eps, exclude_self=True)
            clouds.append(AxisCloud.from_points(bank, radius, eps, loo.sort().values, mean_dimension, bank_dtype=bank_dtype))
        return cls(clouds, dimension_neighbours=dimension_neighbours, dimension_weight=dimension_weight)

    # ---- scoring ------------------------------------------------------------------------------------
    def log_correlation_integrals(self, z: torch.Tensor, own_axis: torch.Tensor | None = None) -> torch.Tensor:
        """log C_a(z) for every axis: [Q, A]. ``own_axis[i] = a`` marks z[i] as a point of bank a at the same
        index order (training points), whose own contribution is left out, as in the bank's LOO scores."""
        columns = []
        for a, cloud in enumerate(self.clouds):
            if own_axis is None or not bool((own_axis == a).any()):
                columns.append(cloud.log_correlation_integral(z))
                continue
            mine = own_axis == a  # these queries are the bank, in order: use its leave-one-out values
            column = torch.empty(len(z))
            column[~mine] = cloud.log_correlation_integral(z[~mine])
            column[mine] = cloud.leave_one_out_log_correlation_integral(z[mine])
            columns.append(column)
        return torch.stack(columns, dim=1)

    def typicality(self, z: torch.Tensor, own_axis: torch.Tensor | None = None) -> torch.Tensor:
        """Conformal typicality u_a(z) ∈ (0, 1] for every axis: [Q, A]."""
        if own_axis is None:
            scores, deviation = self.query_scores(z)
        else:
            scores = self.log_correlation_integrals(z, own_axis)
            deviation = self.dimension_deviation(z, own_axis) if self.dimension_weight > 0 else None
        columns = []
        for a, cloud in enumerate(self.clouds):
            rank = torch.searchsorted(cloud.loo_scores, scores[:, a].contiguous(), right=True)
            columns.append((rank + 1).float() / (len(cloud.loo_scores) + 1))
        u = torch.stack(columns, dim=1)
        if deviation is not None:
            u = u * torch.exp(-self.dimension_weight * deviation)
        return u

    def query_scores(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log C_a(z) and, with the local-dimension term on, |D̂_a(z) − D̄_a| / D̄_a for fresh queries (not bank
        points), both from *one* distance block per cloud and chunk: the same values as
        :meth:`log_correlation_integrals` and :meth:`dimension_deviation`, at the cost of one of them."""
        counts, deviations = [], []
        for cloud in self.clouds:
            m = min(self.dimension_neighbours, len(cloud))
            count_blocks, neighbour_blocks = [], []
            for s in range(0, len(z), _CHUNK):
                distances = cloud.query_distances(z[s : s + _CHUNK])
                count_blocks.append(soft_log_count(distances, cloud.radius, cloud.epsilon, len(cloud)))
                if self.dimension_weight > 0:
                    neighbour_blocks.append(distances.topk(m, dim=1, largest=False).values)
            counts.append(torch.cat(count_blocks) if count_blocks else torch.empty(0))
            if self.dimension_weight > 0:
                local = levina_bickel_dimension(torch.cat(neighbour_blocks)).float()
                deviations.append((local - cloud.mean_dimension).abs() / cloud.mean_dimension)
        return torch.stack(counts, dim=1), torch.stack(deviations, dim=1) if deviations else None

    def dimension_deviation(self, z: torch.Tensor, own_axis: torch.Tensor | None = None) -> torch.Tensor:
        """|D̂_a(z) − D̄_a| / D̄_a for every axis: [Q, A] (the optional local-dimension term).

        ``own_axis`` as in :meth:`log_correlation_integrals`: a bank point leaves itself out of its own
        cloud's neighbours, as D̄_a was measured. Otherwise its zero distance to itself would be its nearest
        neighbour and drive its local dimension towards 0: bank points (Stage 2's training rows) would look
        atypical of their own cloud while fresh prompts from the same cloud would not.
        """
        columns = []
        for a, cloud in enumerate(self.clouds):
            mine = torch.zeros(len(z), dtype=torch.bool) if own_axis is None else own_axis == a
            bank_row = torch.full((len(z),), -1, dtype=torch.long)
            bank_row[mine] = torch.arange(int(mine.sum()))  # the bank's own points, in bank order
            m = min(self.dimension_neighbours, len(cloud) - int(bool(mine.any())))
            blocks = []
            for s in range(0, len(z), _CHUNK):
                distances = cloud.query_distances(z[s : s + _CHUNK])
                rows = torch.nonzero(bank_row[s : s + _CHUNK] >= 0).flatten()
                distances[rows, bank_row[s : s + _CHUNK][rows]] = math.inf
                blocks.append(distances.topk(m, dim=1, largest=False).values)
            local = levina_bickel_dimension(torch.cat(blocks)).float()
            columns.append((local - cloud.mean_dimension).abs() / cloud.mean_dimension)
        return torch.stack(columns, dim=1)

    @staticmethod
    def distribution(u: torch.Tensor) -> torch.Tensor:
        """q^frac = u / Σ_a u_a."""
        return u / u.sum(dim=1, keepdim=True)

    # ---- persistence --------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for a, cloud in enumerate(self.clouds):
            out[f"fractal.{a}.centred"] = cloud.centred.contiguous()  # files keep the row-major [N, k] layout
            out[f"fractal.{a}.centre"] = cloud.centre
            out[f"fractal.{a}.loo_scores"] = cloud.loo_scores
            out[f"fractal.{a}.scalars"] = torch.tensor([cloud.radius, cloud.epsilon, cloud.mean_dimension])
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], num_axes: int, **options) -> "FractalCalibrator":
        """The calibrator in query form, each bank as it was stored; files that stored the float64 banks
        (``points``) load too, in float32."""
        clouds = []
        for a in range(num_axes):
            radius, eps, dimension = tensors[f"fractal.{a}.scalars"].tolist()
            loo = tensors[f"fractal.{a}.loo_scores"]
            if f"fractal.{a}.centred" in tensors:
                clouds.append(AxisCloud(tensors[f"fractal.{a}.centred"], tensors[f"fractal.{a}.centre"], radius, eps,
                                        loo, dimension))
            else:
                clouds.append(AxisCloud.from_points(tensors[f"fractal.{a}.points"], radius, eps, loo, dimension,
                                                    keep_exact=False))
        return cls(clouds, **options)


def exact_log_correlation_integral(
    queries: torch.Tensor, bank: torch.Tensor, radius: float, epsilon: float, *, exclude_self: bool
) -> torch.Tensor:
    """log C(z) with exact float64 distances (fitting; ``exclude_self``: leave-one-out over the bank)."""
    n = len(bank) - (1 if exclude_self else 0)
    out = [soft_log_count(d, radius, epsilon, n).float() for d in distance_blocks(queries, bank, exclude_self=exclude_self)]
    return torch.cat(out) if out else torch.empty(0)
