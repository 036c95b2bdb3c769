"""The fractal calibrator: dimension estimates, typicality, and the out-of-distribution gate."""

import pytest
import torch

from alignx.stage2.fractal import FLOAT16_TOLERANCE, FractalCalibrator, kth_neighbour_distances, levina_bickel_dimension


def _embedded(points: torch.Tensor, ambient: int, seed: int) -> torch.Tensor:
    """Place low-dimensional points in a random orientation of a higher-dimensional space."""
    rotation, _ = torch.linalg.qr(torch.randn(ambient, ambient, generator=torch.Generator().manual_seed(seed)))
    padded = torch.cat([points, torch.zeros(len(points), ambient - points.shape[1])], dim=1)
    return padded @ rotation


@pytest.mark.parametrize("dimension", [1, 2, 5])
def test_levina_bickel_recovers_known_dimensions(dimension):
    generator = torch.Generator().manual_seed(dimension)
    cube = torch.rand(4000, dimension, generator=generator)
    points = _embedded(cube, 16, seed=dimension)
    estimate = float(levina_bickel_dimension(kth_neighbour_distances(points, 20, exclude_self=True)).mean())
    assert abs(estimate - dimension) / dimension < 0.15, estimate


def _clouds(seed=0, n=300):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[6.0, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, 6.0, 0]])
    return [centre + torch.randn(n, 4, generator=generator) for centre in centres]


def test_in_cloud_points_are_typical_and_off_manifold_points_trip_the_gate():
    banks = _clouds()
    calibrator = FractalCalibrator.fit(banks)
    held_out = _clouds(seed=1, n=100)
    u_in = calibrator.typicality(torch.cat(held_out))
    labels = torch.arange(3).repeat_interleave(100)
    assert (u_in.argmax(1) == labels).float().mean() > 0.97
    assert (u_in.max(1).values < 0.05).float().mean() < 0.1  # in-distribution prompts rarely flagged

    far = torch.randn(100, 4, generator=torch.Generator().manual_seed(2)) * 2 + torch.tensor([0, 0, 0, 15.0])
    u_far = calibrator.typicality(far)
    assert (u_far.max(1).values < 0.05).float().mean() > 0.9  # off-manifold inputs trip the gate
    q_in, q_far = FractalCalibrator.distribution(u_in), FractalCalibrator.distribution(u_far)
    entropy = lambda q: float(-(q * q.log()).sum(1).mean())  # noqa: E731
    assert entropy(q_far) > entropy(q_in) + 0.3  # and get a flatter fractal distribution


def test_clouds_of_different_sizes_are_comparable():
    # the same distribution sampled 100 vs 2000 times: fraction-matched radii + conformal ranks make a
    # point of that distribution equally typical for both clouds
    generator = torch.Generator().manual_seed(3)
    small, large = torch.randn(100, 4, generator=generator), torch.randn(2000, 4, generator=generator)
    calibrator = FractalCalibrator.fit([small, large])
    u = calibrator.typicality(torch.randn(500, 4, generator=generator))
    assert abs(float(u[:, 0].mean() - u[:, 1].mean())) < 0.08


def test_leave_one_out_scoring_of_bank_points_matches_the_conformal_reference():
    banks = _clouds(n=200)
    calibrator = FractalCalibrator.fit(banks)
    points = torch.cat(banks)
    own = torch.arange(3).repeat_interleave(200)
    u = calibrator.typicality(points, own_axis=own)
    # each bank point's own-axis typicality is its rank among the bank's LOO scores: uniform on (0, 1]
    own_u = u[torch.arange(600), own]
    assert 0.45 < float(own_u.mean()) < 0.55
    naive = calibrator.typicality(points)[torch.arange(600), own]
    assert float(naive.mean()) > float(own_u.mean()) + 0.05  # counting itself would inflate typicality


def test_dimension_mode_and_dimension_term_are_switchable():
    banks = _clouds()
    plain = FractalCalibrator.fit(banks)
    assert all(3.0 < c.mean_dimension < 5.0 for c in plain.clouds)  # 4-d Gaussians
    by_dimension = FractalCalibrator.fit(banks, epsilon_mode="dimension")
    assert all(0.03 <= c.epsilon <= 0.10 for c in by_dimension.clouds)
    with_term = FractalCalibrator.fit(banks, dimension_weight=1.0)
    z = torch.cat(_clouds(seed=5, n=20))
    assert torch.all(with_term.typicality(z) <= plain.typicality(z) + 1e-6)  # the term only penalises
    assert not torch.allclose(with_term.typicality(z), plain.typicality(z))


def test_bank_points_and_fresh_points_of_a_cloud_are_equally_typical_with_the_dimension_term():
    # Stage 2 trains on bank points (own_axis) and routes fresh prompts: the two must be scored alike, or the
    # router learns a typicality that inference never shows. A bank point that counted itself as its own
    # nearest neighbour would get a local dimension near 0 (measured before the fix: 0.21 vs 0.41).
    banks, fresh = _clouds(n=300), _clouds(seed=7, n=300)
    own = torch.arange(3).repeat_interleave(300)
    for weight in (0.0, 1.0):
        calibrator = FractalCalibrator.fit(banks, dimension_weight=weight)
        u_bank = calibrator.typicality(torch.cat(banks), own_axis=own)[torch.arange(900), own]
        u_fresh = calibrator.typicality(torch.cat(fresh))[torch.arange(900), own]
        assert abs(float(u_bank.mean() - u_fresh.mean())) < 0.05, (weight, float(u_bank.mean()), float(u_fresh.mean()))
    deviation_bank = calibrator.dimension_deviation(torch.cat(banks), own_axis=own)[torch.arange(900), own]
    deviation_fresh = calibrator.dimension_deviation(torch.cat(fresh))[torch.arange(900), own]
    assert abs(float(deviation_bank.mean() - deviation_fresh.mean())) < 0.05
    # other axes' columns of a bank point are plain queries: leaving a point out happens in its own cloud only
    other = calibrator.dimension_deviation(torch.cat(banks), own_axis=own)[:300, 1:]
    assert torch.equal(other, calibrator.dimension_deviation(banks[0])[:, 1:])


def test_a_saved_calibrator_keeps_the_query_form_only_and_scores_alike():
    banks = _clouds()
    fitted = FractalCalibrator.fit(banks)
    state = fitted.state()
    assert not any(t.dtype == torch.float64 and t.dim() == 2 for t in state.values())  # no float64 bank is saved
    loaded = FractalCalibrator.from_state(state, 3)
    assert all(c.exact is None for c in loaded.clouds)
    queries = torch.cat(_clouds(seed=1, n=50))
    assert torch.equal(loaded.typicality(queries), fitted.typicality(queries))
    own = torch.arange(3).repeat_interleave(300)
    with pytest.raises(ValueError, match="leave-one-out needs the exact bank"):
        loaded.typicality(torch.cat(banks), own_axis=own)


def test_files_that_stored_the_float64_banks_still_load():
    banks = _clouds()
    fitted = FractalCalibrator.fit(banks)
    legacy = {k: v for k, v in fitted.state().items() if not k.endswith((".centred", ".centre"))}
    legacy.update({f"fractal.{a}.points": bank.double() for a, bank in enumerate(banks)})
    queries = torch.cat(_clouds(seed=1, n=50))
    assert torch.equal(FractalCalibrator.from_state(legacy, 3).typicality(queries), fitted.typicality(queries))


def test_float16_banks_are_kept_where_they_barely_move_the_scores():
    generator = torch.Generator().manual_seed(4)
    centres = torch.eye(3, 64) * 6.0  # 64-d clouds: neighbour radii of the order of the spread, as real features
    banks = [centre + torch.randn(400, 64, generator=generator) for centre in centres]
    exact, compact = FractalCalibrator.fit(banks), FractalCalibrator.fit(banks, bank_dtype="float16")
    assert all(c.centred.dtype == torch.float16 for c in compact.clouds)
    queries = torch.cat([centre + torch.randn(100, 64, generator=generator) for centre in centres])
    own = torch.arange(3).repeat_interleave(100)
    in_cloud = lambda calibrator: calibrator.log_correlation_integrals(queries)[torch.arange(300), own]  # noqa: E731
    assert 0 < float((in_cloud(exact) - in_cloud(compact)).abs().max()) < FLOAT16_TOLERANCE
    q_exact = FractalCalibrator.distribution(exact.typicality(queries))
    q_compact = FractalCalibrator.distribution(compact.typicality(queries))
    assert float((q_exact - q_compact).abs().max()) < 0.01
    reloaded = FractalCalibrator.from_state(compact.state(), 3)
    assert all(c.centred.dtype == torch.float16 for c in reloaded.clouds)
    assert torch.equal(reloaded.typicality(queries), compact.typicality(queries))


def test_float16_is_refused_where_it_would_move_the_scores():
    # 4-d clouds with tight neighbour radii: rounding to float16 moves log C by ~0.02 there
    compact = FractalCalibrator.fit(_clouds(), bank_dtype="float16")
    assert all(c.centred.dtype == torch.float32 for c in compact.clouds)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_fresh_queries_share_one_distance_pass_and_score_as_the_separate_paths(weight):
    calibrator = FractalCalibrator.fit(_clouds(), dimension_weight=weight)
    z = torch.cat(_clouds(seed=9, n=40))
    counts, deviation = calibrator.query_scores(z)
    torch.testing.assert_close(counts, calibrator.log_correlation_integrals(z))
    if weight:
        torch.testing.assert_close(deviation, calibrator.dimension_deviation(z))
    else:
        assert deviation is None
