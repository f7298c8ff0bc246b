"""The testbed's analyses (safety_units.experiments.synthetic.analysis) on planted activations and updates: safe /
unsafe separation per layer, an update's row- and null-space shares, where inputs land on the safe -> unsafe axis."""

import pytest

def test_separation_probe_and_cluster_distance_on_planted_clusters():
    import torch

    from safety_units.experiments.synthetic.analysis import separation

    g = torch.Generator().manual_seed(0)
    safe = torch.randn(2, 200, 16, generator=g)
    unsafe = torch.randn(2, 200, 16, generator=g)
    unsafe[1, :, 3] += 6.0  # layer 1 separates along one direction, layer 0 does not
    sep = separation(safe, unsafe)
    assert sep[1]["probe_accuracy"] > 0.95 and 0.35 < sep[0]["probe_accuracy"] < 0.65
    assert sep[1]["cluster_distance"] > 3 * sep[0]["cluster_distance"]


def test_update_shares_split_row_and_null_space():
    import torch

    from safety_units.experiments.synthetic.analysis import update_subspace_shares

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    w0 = torch.randn(6, 3, generator=g) @ basis[:, :3].T          # rank 3: row space = first 3 basis vectors
    in_null = torch.randn(6, 5, generator=g) @ basis[:, 3:].T
    assert update_subspace_shares(w0, w0 + in_null)["null_space"] == pytest.approx(1.0, abs=1e-9)
    shares = update_subspace_shares(w0, 1.1 * w0)
    assert shares["row_space"] == pytest.approx(1.0, abs=1e-9) and shares["rank"] == 3
    assert shares["chance_null_space"] == pytest.approx(1 - 3 / 8)  # an isotropic update: 5 of 8 input dims
    # sparsity: an update on 1% of the entries is all top share; a dense Gaussian one puts ~6% there
    big = torch.randn(100, 100, generator=g)
    sparse = torch.zeros(100, 100)
    sparse.view(-1)[torch.randperm(10000, generator=g)[:100]] = torch.randn(100, generator=g)
    assert update_subspace_shares(big, big + sparse)["top_share"] == pytest.approx(1.0)
    assert 0.03 < update_subspace_shares(big, big + torch.randn(100, 100, generator=g))["top_share"] < 0.12


def test_placement_puts_inputs_on_the_safe_unsafe_axis():
    import torch

    from safety_units.experiments.synthetic.analysis import placement

    g = torch.Generator().manual_seed(0)
    safe = torch.randn(1, 100, 8, generator=g) * 0.1
    unsafe = safe + torch.tensor([2.0] + [0.0] * 7)
    near_safe = safe[:, :50] + torch.tensor([0.4] + [0.0] * 7)
    p = placement(safe, unsafe, near_safe)[0]
    assert p["position"] == pytest.approx(0.2, abs=0.05) and p["nearer_safe"] == 1.0

