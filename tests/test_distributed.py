"""Data-parallel DP-SGD over torch.distributed (gloo, 2 CPU processes) against one process."""

from __future__ import annotations

import queue as queue_mod

import dist_workers as w
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def launch(fn: str, world: int, tmp_path, *args, timeout_s: float = 30.0, wait_s: float = 120.0) -> dict:
    """Run dist_workers.<fn> on ``world`` spawned ranks; returns {rank: (status, result)}."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = tmp_path / "store"
    procs = [ctx.Process(target=w.run, args=(fn, world, r, str(store), q, args, timeout_s)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        while len(results) < world:
            rank, status, out = q.get(timeout=wait_s)
            if isinstance(out, dict):
                out = {k: torch.from_numpy(v) for k, v in out.items()}
            elif status == "ok" and out is not None:
                out = torch.from_numpy(out)
            results[rank] = (status, out)
    except queue_mod.Empty:
        pytest.fail(f"ranks {sorted(set(range(world)) - set(results))} neither finished nor failed in {wait_s} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


def test_two_ranks_match_one_process_with_sigma_zero(tmp_path):
    single = w.train(1, 0)
    results = launch("train", 2, tmp_path)
    for status, out in results.values():
        assert status == "ok", out
        for name, ref in single.items():
            # float64: the ranks add their clipped sums in another order than one process does
            torch.testing.assert_close(out[name], ref, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")
    for name in single:
        assert torch.equal(results[0][1][name], results[1][1][name]), "all ranks end with identical parameters"


def test_noise_is_added_once_with_std_sigma_c_over_b(tmp_path):
    sigma, n = 2.0, 1 << 20
    results = launch("noise_update", 2, tmp_path, sigma, n)
    assert all(status == "ok" for status, _ in results.values()), results
    z0, z1 = results[0][1], results[1][1]
    assert torch.equal(z0, z1), "both ranks apply the same noisy update"
    expected = sigma * w.C / w.B
    # std of n i.i.d. normals has standard error std / sqrt(2 n); 6 of them. Noise drawn on both ranks and summed
    # would give sqrt(2) * expected, and noise divided by the world size expected / 2: both far outside.
    se = expected / (2 * n) ** 0.5
    assert abs(z0.double().std().item() - expected) < 6 * se
    assert abs(z0.double().mean().item()) < 6 * expected / n**0.5


def test_a_failing_rank_stops_the_job_with_a_clear_error(tmp_path):
    results = launch("failing", 2, tmp_path, timeout_s=10.0, wait_s=90.0)
    assert results[1][0] == "error" and "fails on purpose" in results[1][1]
    status, message = results[0]
    assert status == "error"
    assert "all-reduce of the clipped sums" in message and "rank 0 of 2" in message
