"""GaLore, APOLLO, APOLLO-Mini and Fira under FSDP2 and DDP, whole-model and layer-wise, on 2 CPU processes (gloo)
== the single-process run on the same global batches."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from lowrank_train.optim import GaLore

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
_spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# case -> absolute tolerance. An exact SVD basis turns rounding differences between the sharded and the
# single-process gradient (sums in another order) into basis differences amplified by 1 / (s_r - s_{r+1});
# the seeded projectors and the randomized SVD stay at fp32 rounding level.
CASES = {
    "fsdp2-mlp-svd-1": 2e-4,  # measured 5e-5
    "fsdp2-mlp-rsvd-2": 2e-6,  # 2 micro-batches: GaLore.accumulate_grad on sharded gradients
    "fsdp2-mlp-random-1": 2e-6,
    "fsdp2-mlp-qrsvd-1": 2e-6,  # Q-GaLore options: INT4 basis codes and the adaptive gap are broadcast state
    "ddp-mlp-svd-2": 2e-6,  # DDP all-reduces the full gradient: the plain GaLore path
}
# Update rules on shards (issue 21 item 2): 40x24 projects columns (m > n, the projection split by columns),
# 13x40 and 13x13 project rows (m <= n, the projection all-reduced); 13 rows split 7 + 6. The limiter (gamma 1.001)
# bites on most steps, so its norm must be the all-reduced one. Accumulation 2 sums sharded gradients in .grad.
RULE_CASES = {
    "fsdp2-mlp-apollo-1": 2e-6,  # channel-wise scales: no communication
    "fsdp2-mlp-apollo-2": 2e-6,
    "fsdp2-mlp-apollomini-1": 2e-6,  # tensor-wise scale: all-reduced norms where m > n
    "fsdp2-mlp-apollomini-2": 2e-6,
    "fsdp2-mlp-fira-1": 2e-4,  # an exact SVD basis, as fsdp2-mlp-svd-1
}
# Layer-wise under FSDP2 (issue 22 item 2), against the single-process layer-wise and whole-model runs: GaLore with
# projected accumulation, APOLLO with .grad accumulation (the raw gradient is read at the step), per-param clipping.
LAYERWISE_CASES = {
    "fsdp2lw-mlp-rsvd-2": 2e-6,
    "fsdp2lw-mlp-random-1": 2e-6,
    "fsdp2lw-mlp-apollo-2": 2e-6,
    "fsdp2lw-mlp-apollomini-1": 2e-6,
    "fsdp2lwclip-mlp-rsvd-2": 2e-6,
}


def run_workers(tmp_path: pathlib.Path, cases: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    out = tmp_path / "result.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(WORKER), str(out), *cases], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return torch.load(out, weights_only=True)


def single_process_reference(case: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, final) parameters of the ordinary (whole-model ``step()``) single-process run of ``case``."""
    _, kind, method, accum = case.split("-")
    model = worker.build_model(kind)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = worker.make_optimizer(model, method, sharded=False)
    assert isinstance(optimizer, GaLore)
    worker.train(model, optimizer, worker.global_batches(kind, int(accum)), slice(None))
    return initial, {n: p.detach().clone() for n, p in model.named_parameters()}


def single_process_layerwise(case: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Final parameters and per-step gradient norms of the single-process layer-wise run of ``case``."""
    engine, kind, method, accum = case.split("-")
    model = worker.build_model(kind)
    layerwise = worker.make_layerwise(model, method, False, int(accum), clip=engine == "fsdp2lwclip")
    norms = worker.train_layerwise(model, layerwise, worker.global_batches(kind, int(accum)), slice(None))
    layerwise.remove_hooks()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One torchrun for every 2-process case of this file (the start-up dominates)."""
    checks = ["placements", "nonfinite", "layerwise-nonfinite", "layerwise-resume"]
    cases = [*CASES, *RULE_CASES, *LAYERWISE_CASES, *checks]
    return run_workers(tmp_path_factory.mktemp("fsdp"), cases)


def test_two_process_runs_match_single_process(results):
    # A NaN in rank 1's gradient shard only: both ranks skip (count 1, nothing moves), or both refuse; checked
    # through the gradient (0.weight) or through the all-reduced projection (3.weight, between refreshes).
    for r in (0, 1):
        for rows in ("", "-rows"):
            assert results["nonfinite"][f"skip{rows}-rank{r}"].tolist() == [1, 0, 1], (r, rows)
            assert results["nonfinite"][f"raise{rows}-rank{r}"].tolist() == [0, 1, 1], (r, rows)
    for case, atol in CASES.items():
        initial, reference = single_process_reference(case)
        for name, expected in reference.items():
            moved = (expected - initial[name]).abs().max().item()
            assert moved > 50 * atol, f"{case} {name}: the reference hardly moved ({moved:.1e})"
            torch.testing.assert_close(results[case][name], expected, rtol=0, atol=atol, msg=f"{case} {name}")


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_update_rules_under_fsdp2_match_single_process(results, case):
    atol = RULE_CASES[case]
    initial, reference = single_process_reference(case)
    for name, expected in reference.items():
        moved = (expected - initial[name]).abs().max().item()
        assert moved > 50 * atol, f"{case} {name}: the reference hardly moved ({moved:.1e})"
        torch.testing.assert_close(results[case][name], expected, rtol=0, atol=atol, msg=f"{case} {name}")


@pytest.mark.parametrize("case", list(LAYERWISE_CASES))
def test_layerwise_under_fsdp2_matches_single_process(results, case):
    atol = LAYERWISE_CASES[case]
    found = results[case]
    layerwise, norms = single_process_layerwise(case)
    torch.testing.assert_close(found["norms"], norms, rtol=1e-5, atol=1e-6, msg=f"{case}: gradient norms")
    initial, whole_model = single_process_reference(case)
    clipped = case.startswith("fsdp2lwclip")
    for name, expected in layerwise.items():
        moved = (expected - initial[name]).abs().max().item()
        assert moved > 50 * atol, f"{case} {name}: the reference hardly moved ({moved:.1e})"
        torch.testing.assert_close(found[name], expected, rtol=0, atol=atol, msg=f"{case} {name} (layer-wise)")
        if not clipped:  # the whole-model loop has no in-flight clipping
            torch.testing.assert_close(found[name], whole_model[name], rtol=0, atol=atol, msg=f"{case} {name}")
    if clipped:
        assert (norms > worker.CLIP).all(), "the clip threshold never bit"
    if case.endswith("-1"):  # each shard was stepped and freed inside its reduce-scatter hook
        assert int(found["live_grads"]) == 0


def test_layerwise_under_fsdp2_resumes_bit_for_bit_through_weights_only(results):
    """Per-rank engine state (DTensor moments of the plain shards included) survives torch.load(weights_only=True);
    3 + 3 resumed steps (accumulation 2, a refresh after the resume) equal 6 straight ones exactly."""
    for r in (0, 1):
        assert results["layerwise-resume"][f"rank{r}"].tolist() == [1, 1], r


def test_layerwise_nonfinite_shard_is_skipped_on_every_rank(results):
    """A NaN in one rank's shard: the all-reduced check makes both ranks skip that weight (and only it)."""
    for r in (0, 1):
        assert results["layerwise-nonfinite"][f"rank{r}"].tolist() == [1, 1, 1], r


@pytest.mark.slow
def test_tiny_llama_under_fsdp2_matches_single_process(tmp_path):
    case = "fsdp2-llama-rsvd-2"
    results = run_workers(tmp_path, [case])
    initial, reference = single_process_reference(case)
    for name, expected in reference.items():
        assert not torch.equal(expected, initial[name]), name
        torch.testing.assert_close(results[case][name], expected, rtol=0, atol=2e-5, msg=name)


def test_plain_galore_points_sharded_parameters_to_fsdp2galore(tmp_path):
    """A DTensor parameter in plain GaLore is refused with a message naming the FSDP2 optimizer."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowrank_train.optim import GaLoreAdamW

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = nn.Parameter(distribute_tensor(torch.randn(8, 16), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match=r"w \(shape \(8, 16\)\) is an FSDP2-sharded DTensor.*FSDP2GaLore"):
            GaLoreAdamW([{"params": [weight], "param_names": ["w"], "rank": 2}])
    finally:
        from lowrank_train.train.parallel import end_process_group

        end_process_group()


def test_fsdp2_layerwise_refuses_parameters_of_an_unsharded_model():
    """Groups taken before fully_shard (plain tensors) are refused, naming the parameter; so is a process group."""
    from torch import nn

    from lowrank_train.integrations.fsdp import FSDP2GaLore, fsdp2_layerwise
    from lowrank_train.optim import lowrank_param_groups

    model = nn.Sequential(nn.Linear(8, 16))
    groups = lowrank_param_groups(model, rank=2)
    with pytest.raises(ValueError, match=r"0\.weight \(shape \(16, 8\)\) is not an FSDP2 \(DTensor\).*fully_shard"):
        fsdp2_layerwise(groups, lambda g: FSDP2GaLore(g, lr=1e-3))
    with pytest.raises(ValueError, match="process_group"):
        fsdp2_layerwise(groups, lambda g: FSDP2GaLore(g, lr=1e-3), process_group=None)
