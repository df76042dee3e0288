"""Greedy k-center coreset: exact, fast path agrees with the textbook loop, covers well."""
import numpy as np
import pytest

from patchwatch.anomaly.coreset import (bank_covering_radius, greedy_coreset, greedy_coreset_exhaustive, projection_matrix,
                             random_projection, streaming_coreset)


def clustered_bank(rows=6000, dim=32, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 3
    # uneven cluster sizes, like patch features: a few rare appearances among common ones
    weights = rng.dirichlet(np.full(clusters, 0.3))
    members = rng.choice(clusters, rows, p=weights)
    return (centres[members] + 0.4 * rng.standard_normal((rows, dim))).astype(np.float32)


def covering_radius(points, centres):
    distances = np.sqrt(((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
    return distances.min(1).max()


def test_lazy_blocked_greedy_selects_exactly_what_the_textbook_loop_selects():
    bank = clustered_bank()
    reference = greedy_coreset_exhaustive(bank, 120, start=7)
    fast = greedy_coreset(bank, 120, start=7, block_rows=256)
    np.testing.assert_array_equal(fast.indices, reference.indices)
    assert fast.covering_radius == pytest.approx(reference.covering_radius, rel=1e-4)
    assert fast.covering_radius == pytest.approx(covering_radius(bank, bank[fast.indices]), rel=1e-4)


def test_coreset_covers_far_better_than_a_random_subset_of_the_same_size():
    bank = clustered_bank()
    chosen = greedy_coreset(bank, 60).indices
    random_subset = np.random.default_rng(1).choice(len(bank), 60, replace=False)
    assert covering_radius(bank, bank[chosen]) < 0.6 * covering_radius(bank, bank[random_subset])


def test_streaming_composable_coreset_stays_close_to_single_machine_greedy():
    bank = clustered_bank(rows=8000)
    matrix = projection_matrix(bank.shape[1], 16, seed=0)
    projected = random_projection(bank, 16, seed=0)
    chunks = [bank[i:i + 1000] for i in range(0, len(bank), 1000)]
    whole = streaming_coreset(chunks, len(bank), 100, matrix, chunk_rows=len(bank))
    pieces = streaming_coreset(chunks, len(bank), 100, matrix, chunk_rows=2000)
    assert len(np.unique(pieces.indices)) == 100
    radius_whole = covering_radius(projected, projected[whole.indices])
    radius_pieces = covering_radius(projected, projected[pieces.indices])
    assert radius_whole == pytest.approx(whole.covering_radius, rel=1e-4)
    assert np.isnan(pieces.covering_radius)  # unknown until measured over the whole bank
    measured = bank_covering_radius(iter(chunks), bank[pieces.indices], matrix)
    assert measured == pytest.approx(radius_pieces, rel=1e-4)
    # the composable selection is a 2-approximation in theory; in practice it is close
    assert radius_pieces < 1.5 * radius_whole


def test_single_chunk_streaming_equals_in_memory_selection():
    bank = clustered_bank(rows=3000)
    matrix = projection_matrix(bank.shape[1], 16, seed=3)
    chunks = [bank[i:i + 700] for i in range(0, len(bank), 700)]
    streamed = streaming_coreset(chunks, len(bank), 50, matrix, seed=3)
    in_memory = streaming_coreset([bank], len(bank), 50, matrix, seed=3)
    np.testing.assert_array_equal(streamed.indices, in_memory.indices)


def test_projection_keeps_small_banks_as_they_are():
    bank = clustered_bank(rows=100, dim=8)
    np.testing.assert_array_equal(random_projection(bank, 128), bank)
    assert random_projection(clustered_bank(rows=100, dim=256), 64).shape == (100, 64)


def test_extending_a_coreset_continues_the_traversal_over_the_new_rows_only():
    bank = clustered_bank(rows=5000, seed=3)
    old_rows, new_rows = bank[:4000], bank[4000:]
    old = greedy_coreset(old_rows, 80, start=0)
    old_centres = old_rows[old.indices]
    extended = greedy_coreset(new_rows, 20, block_rows=128, covered_by=old_centres)
    # the textbook loop seeded with the old centres: each new row starts at its distance to them
    nearest = np.sqrt(((new_rows[:, None, :] - old_centres[None]) ** 2).sum(-1)).min(1)
    expected = []
    for _ in range(20):
        chosen = int(np.argmax(nearest))
        expected.append(chosen)
        nearest = np.minimum(nearest, np.sqrt(((new_rows - new_rows[chosen]) ** 2).sum(-1)))
    np.testing.assert_array_equal(extended.indices, expected)
    assert extended.covering_radius == pytest.approx(nearest.max(), rel=1e-4)
    # old rows stay covered by the old centres: the union's radius is the larger of the two
    union = np.concatenate([old_centres, new_rows[extended.indices]])
    assert covering_radius(bank, union) == pytest.approx(max(old.covering_radius, extended.covering_radius), rel=1e-4)


def test_extending_with_no_new_centres_reports_how_far_the_new_rows_are():
    bank = clustered_bank(rows=600, seed=4)
    centres = bank[:50]
    result = greedy_coreset(bank[50:], 0, covered_by=centres)
    assert len(result.indices) == 0
    assert result.covering_radius == pytest.approx(covering_radius(bank[50:], centres), rel=1e-4)
