"""DeepSpeed: ZeRO-0 carries GaLore (2 processes == single process); flattening configurations are refused."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from lowrank_train.integrations.deepspeed import check_deepspeed_config, deepspeed_initialize
from lowrank_train.optim import GaLore

HERE = pathlib.Path(__file__).parent
_spec = importlib.util.spec_from_file_location("distributed_worker", HERE / "distributed_worker.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

REFUSED = [
    pytest.param({"zero_optimization": {"stage": 1}}, "ZeRO stage 1 cannot carry", id="zero1"),
    pytest.param({"zero_optimization": {"stage": 2}}, "ZeRO stage 2 cannot carry", id="zero2"),
    pytest.param({"zero_optimization": {"stage": 3}}, "fully_shard", id="zero3"),
    pytest.param({"bf16": {"enabled": True}}, "torch_autocast", id="bf16"),
    pytest.param({"fp16": {"enabled": True}}, "master-weight", id="fp16"),
    pytest.param({"optimizer": {"type": "AdamW"}}, 'remove the "optimizer" section', id="ds-optimizer"),
]


@pytest.mark.parametrize("config, message", REFUSED)
def test_flattening_configs_are_refused_with_the_alternative(config, message):
    with pytest.raises(ValueError, match=message):
        check_deepspeed_config(config)


def test_refusal_happens_before_deepspeed_is_touched(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    model = common.build_model("mlp")
    with pytest.raises(ValueError, match="FSDP2"):
        deepspeed_initialize(model, common.make_optimizer(model, "svd", GaLore), path)


def reference(autocast: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = common.build_model("mlp")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = common.make_optimizer(model, "svd", GaLore)
    for ((inputs, targets),) in common.global_batches("mlp", 1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(inputs)
        torch.nn.functional.mse_loss(out.float(), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    return initial, {n: p.detach().clone() for n, p in model.named_parameters()}


def run_worker(out: pathlib.Path, processes: int) -> dict[str, dict[str, torch.Tensor]]:
    """Runs deepspeed_worker.py on ``processes`` CPU ranks for both accepted configs (fp32, torch_autocast)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    done = subprocess.run(
        [*command, str(HERE / "deepspeed_worker.py"), str(out), "fp32", "autocast"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is an optional extra")
def test_accepted_configs_train_in_one_process_exactly_like_the_plain_loop(tmp_path):
    """ZeRO 0 in fp32 and with torch_autocast pass the check and train: one rank equals GaLore without DeepSpeed."""
    results = run_worker(tmp_path / "result.pt", processes=1)
    for case, autocast in (("fp32", False), ("autocast", True)):
        initial, expected = reference(autocast=autocast)
        for name, p in results[case].items():
            assert not torch.equal(expected[name], initial[name]), name
            torch.testing.assert_close(p, expected[name], rtol=0, atol=0, msg=f"{case} {name}")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is an optional extra")
def test_zero0_engine_on_two_processes_matches_single_process(tmp_path):
    results = run_worker(tmp_path / "result.pt", processes=2)
    initial, expected = reference(autocast=False)
    for name, p in results["fp32"].items():  # same SVD-sensitivity tolerance as the FSDP2 test
        torch.testing.assert_close(p, expected[name], rtol=0, atol=2e-4, msg=name)
    # bf16 autocast: rounding differs between the sharded and the whole batch, so only closeness is checked.
    initial, expected = reference(autocast=True)
    for name, p in results["autocast"].items():
        error = (p - expected[name]).norm() / (expected[name] - initial[name]).norm()
        assert error < 0.3, f"{name}: relative error {error:.2f}"
