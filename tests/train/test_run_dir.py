"""The run folder's resume policy: checkpoints load to the CPU and RNG states come back as CPU ByteTensors (issue 13).

On a GPU the old loader read checkpoints with ``map_location=<the run's device>``, so ``torch.set_rng_state`` got a
CUDA tensor and refused it. This CPU machine has no CUDA device; the ``meta`` device stands in for "not the CPU".
"""

import pytest
import torch
from torch import nn

from lowrank_train.optim import GaLoreAdamW, lowrank_param_groups
from lowrank_train.train import load_state
from lowrank_train.train import run_dir as run_dir_module
from lowrank_train.train.checkpoint import save_checkpoint
from lowrank_train.train.run_dir import capture_rng, checkpoint_state, restore_checkpoint, restore_rng

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _trained(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8)).to(device)
    optimizer = GaLoreAdamW(lowrank_param_groups(model, rank=4, update_gap=2), lr=1e-2)
    for _ in range(3):
        model(torch.randn(4, 16, device=device)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _checkpoint(tmp_path, device):
    """A checkpoint of a trained model, and the random numbers drawn right after its RNG states were captured."""
    model, optimizer = _trained(device)
    state = checkpoint_state(model, optimizer, device, step=3, tokens=12, train_seconds=0.5)
    after = {"cpu": torch.rand(5)}
    if device.type == "cuda":
        after["cuda"] = torch.rand(5, device=device)
    folder = save_checkpoint(tmp_path, 3, state, {"step": 3})
    return folder, model, optimizer, after


def test_the_old_device_map_breaks_rng_restore(tmp_path):
    """What failed on every GPU resume: RNG states mapped off the CPU are refused by torch."""
    folder, *_ = _checkpoint(tmp_path, torch.device("cpu"))
    mapped = load_state(folder, map_location=torch.device("meta"))
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(mapped["rng"]["cpu"])


def test_restore_loads_to_the_cpu_whatever_the_run_device(tmp_path, monkeypatch):
    folder, model, optimizer, after = _checkpoint(tmp_path, torch.device("cpu"))
    locations = []
    real_load = run_dir_module.load_state

    def spy(path, map_location):
        locations.append(map_location)
        return real_load(path, map_location=map_location)

    monkeypatch.setattr(run_dir_module, "load_state", spy)
    fresh, fresh_optimizer = _trained("cpu")
    for p in fresh.parameters():
        nn.init.zeros_(p)
    torch.manual_seed(123)
    point = restore_checkpoint(
        folder, fresh, fresh_optimizer, torch.device("meta")
    )  # a run device that is not the CPU
    assert locations == ["cpu"]
    assert (point.step, point.tokens, point.train_seconds) == (3, 12, 0.5)
    torch.testing.assert_close(torch.rand(5), after["cpu"], rtol=0, atol=0)
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    saved, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(restored["state"][index][key], value, rtol=0, atol=0, msg=key)


def test_restore_rng_takes_what_capture_gives_on_any_map(tmp_path):
    torch.manual_seed(7)
    state = capture_rng(torch.device("cpu"))
    expected = torch.rand(3)
    assert state["cpu"].dtype == torch.uint8 and state["cpu"].device.type == "cpu"
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", map_location="cpu", weights_only=True)
    torch.manual_seed(8)
    restore_rng(loaded, torch.device("cpu"))
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_on_the_run_device_restores_parameters_state_and_rng(tmp_path, device):
    """On CUDA: parameters and optimizer state go back to the GPU, the CPU and CUDA generators both resume."""
    device = torch.device(device)
    folder, model, optimizer, after = _checkpoint(tmp_path, device)
    fresh, fresh_optimizer = _trained(device)
    torch.manual_seed(321)
    restore_checkpoint(folder, fresh, fresh_optimizer, device)
    torch.testing.assert_close(torch.rand(5), after["cpu"], rtol=0, atol=0)
    if device.type == "cuda":
        torch.testing.assert_close(torch.rand(5, device=device), after["cuda"], rtol=0, atol=0)
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        assert a.device.type == device.type
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    batch = torch.randn(4, 16, device=device)
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):  # one more step: the same numbers
        m(batch).square().mean().backward()
        opt.step()
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
