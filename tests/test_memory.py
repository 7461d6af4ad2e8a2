"""The memory estimator against measurement: live tensor bytes after a real step, saved activations."""

import importlib.util
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowrank_train import lowrank_param_groups
from lowrank_train.memory import (
    ModelShape,
    SavedTensorBytes,
    TrainingSetup,
    estimate_memory,
    llama_shape,
    measure_live_bytes,
    quantized_bytes,
)
from lowrank_train.nn import quantize_model
from lowrank_train.nn.chunked_loss import causal_lm_loss
from lowrank_train.optim import GaLore, QGaLoreAdamW4bit, QGaLoreAdamW8bit

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _optimizer(model, kind, rank):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if kind == "adamw8bit":
        return bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    if kind in ("qgalore", "qgalore4bit"):
        quantize_model(model, bits=8, group_size=256)
        cls = QGaLoreAdamW4bit if kind == "qgalore4bit" else QGaLoreAdamW8bit
        return cls(lowrank_param_groups(model, rank=rank), lr=1e-3)
    base = {"galore": "adamw", "galore8bit": "adamw8bit"}[kind]
    return GaLore(lowrank_param_groups(model, rank=rank), base=base, lr=1e-3)


# (dtype, optimizer, rank): bitsandbytes' 8-bit and 32-bit paths are both exercised (its min size is 4096).
STEP_CASES = [
    ("float32", "adamw", None),
    ("bfloat16", "adamw8bit", None),
    ("bfloat16", "galore", 16),
    ("float32", "galore8bit", 16),
    ("bfloat16", "qgalore", 16),
    ("float32", "qgalore4bit", 16),
]


@pytest.mark.parametrize(("dtype", "kind", "rank"), STEP_CASES)
def test_static_and_gradient_bytes_match_a_real_step(dtype, kind, rank):
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    opt = _optimizer(model, kind, rank)
    ids = torch.randint(0, 512, (2, 16))
    causal_lm_loss(model, ids).backward()
    opt.step()
    measured = measure_live_bytes(model, opt)
    # The estimator reads moment bits, INT8 weights and the INT4 basis from the method's registry entry.
    setup = {"batch_size": 2, "seq_len": 16, "dtype": dtype, "optimizer": kind, "rank": rank}
    predicted = estimate_memory(config, setup)
    for component, value in measured.items():
        assert getattr(predicted, component) == pytest.approx(value, rel=0.10), component
    total = sum(measured.values())
    assert predicted.static + predicted.gradients == pytest.approx(total, rel=0.02)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_steps_projected_gradients_are_counted_as_they_are_alive(dtype, monkeypatch):
    """Between refreshes every low-rank weight's R = P^T G is formed by the NaN/Inf check and each is freed when its
    weight is updated: the most bytes of R alive at once during a real step equal the estimate's entry."""
    import weakref

    import lowrank_train.optim.backend as backend

    alive, most = [0], [0]
    project = backend.project_gradient

    def tracked(grad, basis):
        low = project(grad, basis)
        size = low.numel() * low.element_size()
        alive[0] += size
        most[0] = max(most[0], alive[0])
        weakref.finalize(low, lambda: alive.__setitem__(0, alive[0] - size))
        return low

    monkeypatch.setattr(backend, "project_gradient", tracked)
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    opt = GaLore(lowrank_param_groups(model, rank=16, update_gap=10), base="adamw", lr=1e-3)
    ids = torch.randint(0, 512, (2, 16))
    for _ in range(2):  # the first step refreshes (one R at a time); the second is the one measured
        most[0] = 0
        model.zero_grad()
        causal_lm_loss(model, ids).backward()
        opt.step()
    setup = {"batch_size": 2, "seq_len": 16, "dtype": dtype, "optimizer": "galore", "rank": 16}
    assert estimate_memory(config, setup).details["step: projected gradients"] == most[0] > 0
    assert alive[0] == 0


# (dtype, kv heads, checkpointing, batch, seq)
ACTIVATION_CASES = [
    ("float32", 4, False, 2, 24),
    ("bfloat16", 2, False, 3, 16),
    ("float32", 2, True, 2, 32),
    ("bfloat16", 4, True, 1, 40),
]


@pytest.mark.parametrize(("dtype", "kv_heads", "checkpointing", "batch", "seq"), ACTIVATION_CASES)
def test_activation_bytes_match_saved_tensors(dtype, kv_heads, checkpointing, batch, seq):
    torch.manual_seed(0)
    config = LlamaConfig(**{**CONFIG, "num_key_value_heads": kv_heads, "num_hidden_layers": 3})
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 512, (batch, seq))
    with SavedTensorBytes() as saved:
        model.lm_head(model.model(input_ids=ids).last_hidden_state)  # the head saves the final hidden state
    predicted = estimate_memory(
        config,
        TrainingSetup(batch_size=batch, seq_len=seq, dtype=dtype, activation_checkpointing=checkpointing),
    )
    assert predicted.activations == pytest.approx(saved.bytes, rel=0.10)


def test_layerwise_gradients_are_the_largest_single_gradient(tiny_llama):
    largest = max(p.numel() * p.element_size() for p in tiny_llama.parameters())
    est = estimate_memory(tiny_llama.config, {"dtype": "float32", "optimizer": "galore", "rank": 8, "layerwise": True})
    assert est.gradients == largest
    ordinary = estimate_memory(tiny_llama.config, {"dtype": "float32", "optimizer": "galore", "rank": 8})
    assert ordinary.gradients == sum(p.numel() * 4 for p in tiny_llama.parameters())


def test_llama_7b_arithmetic():
    shape = llama_shape("7b")
    assert shape.num_parameters() == 6_738_415_616  # LLaMA-7B's published parameter count
    est = estimate_memory(
        shape,
        dict(
            batch_size=16,
            seq_len=256,
            dtype="bfloat16",
            optimizer="qgalore",
            rank=1024,
            layerwise=True,
            activation_checkpointing=True,
            chunked_loss=True,
        ),
    )
    linear = 32 * sum(m * n for m, n in shape.block_linear_shapes())
    assert est.weights >= quantized_bytes(linear, 8, 256) + 2 * 32000 * 4096 * 2
    assert est.projection_bases < 32 * 7 * 4096 * 1024  # INT4 codes: well under a byte per basis entry
    chunk_logits = estimate_memory(shape, dict(batch_size=16, seq_len=256, chunked_loss=True)).logits
    assert chunk_logits < estimate_memory(shape, dict(batch_size=16, seq_len=256)).logits / 3
    assert "peak" in est.table() and est.peak > est.static


def test_accepts_hf_configs_dicts_and_aliases():
    a = estimate_memory(LlamaConfig(**CONFIG), {"batch": 2, "seq": 16, "dtype": "bf16", "lr": 1e-3})
    b = estimate_memory(
        dict(vocab=512, hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2),
        TrainingSetup(batch_size=2, seq_len=16, dtype="bfloat16"),
    )
    assert a.as_dict() == b.as_dict()
    assert ModelShape.from_config(CONFIG).kv_size == 64


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ({"optimizer": "sgd"}, "optimizer"),
        ({"optimizer": "galore"}, "rank"),
        ({"optimizer": "galore", "rank": 128}, "not below"),
        ({"optimizer": "adamw", "weight_bits": 8}, "GaLore optimizer"),
        ({"dtype": "int8"}, "dtype"),
        ({"batch_size": 0}, "batch_size"),
        ({"proj_bits": 2}, "proj_bits"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_configs(train, match):
    with pytest.raises(ValueError, match=match):
        estimate_memory(CONFIG, train)


def test_bad_model_config():
    with pytest.raises(ValueError, match="lacks"):
        estimate_memory({"vocab_size": 10}, {})
    with pytest.raises(ValueError, match="num_kv_heads"):
        estimate_memory({**CONFIG, "num_key_value_heads": 3}, {})


def test_method_facts_come_from_the_registry_entry():
    """qgalore4bit is Q-GaLore with 4-bit moments; Q-GaLore's defaults are its INT4 basis, INT8 weights and
    adaptive refresh, each of which can still be set explicitly."""
    shape = llama_shape("7b")
    setup = dict(batch_size=16, seq_len=256, rank=1024, layerwise=True, activation_checkpointing=True)
    for device in ("cuda", "cpu"):
        four_bit = estimate_memory(shape, {**setup, "device": device, "optimizer": "qgalore4bit"})
        spelled_out = estimate_memory(shape, {**setup, "device": device, "optimizer": "qgalore", "moment_bits": 4})
        assert four_bit.as_dict() == spelled_out.as_dict()
    defaults = estimate_memory(shape, {**setup, "optimizer": "qgalore"})
    explicit = estimate_memory(
        shape, {**setup, "optimizer": "qgalore", "proj_bits": 4, "weight_bits": 8, "adaptive_refresh": True}
    )
    assert defaults.as_dict() == explicit.as_dict()
    assert (defaults.setup.proj_bits, defaults.setup.weight_bits, defaults.setup.adaptive_refresh) == (4, 8, True)
    galore = estimate_memory(shape, {**setup, "optimizer": "galore"}).setup
    assert (galore.proj_bits, galore.weight_bits, galore.adaptive_refresh) == (None, None, False)


def test_qapollo_mini_7b_recipe_estimates_under_10_gib():
    from lowrank_train.train.config import load_config
    from lowrank_train.train.estimate import estimate_run

    recipe = load_config(REPO / "recipes/configs/llama_7b_qapollo_mini.yaml")
    assert recipe.optimizer.dense_state_bits == 8 and recipe.optimizer.layerwise
    estimate = estimate_run(recipe)
    assert estimate.peak <= 10 * 2**30
    fp32_dense = estimate_run(
        load_config(REPO / "recipes/configs/llama_7b_qapollo_mini.yaml", ["optimizer.dense_state_bits=null"])
    )
    # 8-bit moments of the 2 x 32000 x 4096 embedding and head: ~1 byte + 1/64 instead of 2 bytes per moment.
    saved = fp32_dense.optimizer_states - estimate.optimizer_states
    assert saved == pytest.approx(2 * 2 * 32000 * 4096 * (1 - 1 / 64), rel=0.01)


def _replicated_and_sharded_states(shape, setup):
    """An independent count of GaLore's state under FSDP2: the moments of weights with m <= n are replicated."""
    from lowrank_train.memory import adam_state_bytes

    dtype_bytes = 2
    h, vocab, layers = shape.hidden_size, shape.vocab_size, shape.num_layers
    plain = [vocab * h, vocab * h] + [h] * (2 * layers + 1)
    # Moments are sharded with their parameter; each 0-d fp32 step tensor stays whole.
    sharded = sum(adam_state_bytes(n, dtype_bytes, 32) - 4 for n in plain)
    replicated = 8 + 4 * len(plain)  # GaLore's skipped_steps, the steps
    for m, n in shape.block_linear_shapes():
        moments = adam_state_bytes(setup["rank"] * max(m, n), dtype_bytes, 32) - 4
        replicated += layers * (5 * 8 + 4 + (moments if m <= n else 0))
        sharded += layers * (0 if m <= n else moments)
    return sharded, replicated


def test_per_rank_estimate_divides_what_fsdp2_shards():
    shape = ModelShape.from_config(CONFIG)
    setup = {"batch_size": 2, "seq_len": 16, "dtype": "bfloat16", "optimizer": "galore", "rank": 16}
    one = estimate_memory(shape, setup)
    assert one.as_dict() == estimate_memory(shape, {**setup, "nproc": 1}).as_dict()
    for world in (2, 4):
        per_rank = estimate_memory(shape, {**setup, "world_size": world})
        rope = one.details["rope buffers"]
        assert per_rank.weights == -(-(one.weights - rope) // world) + rope
        sharded, replicated = _replicated_and_sharded_states(shape, setup)
        assert one.optimizer_states == sharded + replicated
        assert per_rank.optimizer_states == -(-sharded // world) + replicated
        assert per_rank.gradients == -(-one.gradients // world)
        # Activations, logits and bases are each rank's own; FSDP2's unsharded buffers are added.
        for kept in ("activations", "logits", "projection_bases"):
            assert getattr(per_rank, kept) == getattr(one, kept), kept
        assert per_rank.communication > 0 and "FSDP2 unsharded buffers" in per_rank.table()
    # At 7B the shards outweigh FSDP2's unsharded buffers (at this tiny size they do not).
    seven = {**setup, "rank": 1024, "batch_size": 16, "seq_len": 256}
    assert (
        estimate_memory(llama_shape("7b"), {**seven, "nproc": 8}).peak < estimate_memory(llama_shape("7b"), seven).peak
    )
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        estimate_memory(shape, {**setup, "world_size": 0})


def test_per_rank_static_bytes_equal_a_two_process_fsdp2_run(tmp_path):
    """benchmarks/fsdp2_memory.py --tiny on 2 gloo processes: each rank's local weight shards and optimizer tensors
    are what the estimator gives one rank of 2."""
    import json
    import os
    import subprocess
    import sys

    bench = REPO / "benchmarks" / "fsdp2_memory.py"
    spec = importlib.util.spec_from_file_location("fsdp2_memory", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = tmp_path / "tiny"
    done = subprocess.run(
        [*command, str(bench), "--worker", str(out), "--tiny"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    predicted = estimate_memory(module.TINY, module.setup(2, tiny=True))
    for rank in (0, 1):
        measured = json.loads(out.with_suffix(f".rank{rank}.json").read_text())
        assert measured["weights"] == predicted.weights, rank
        assert measured["optimizer_states"] == predicted.optimizer_states, rank


def test_cli_estimate_nproc_prints_one_ranks_share(capsys, tmp_path):
    from lowrank_train.cli import main
    from lowrank_train.train.config import load_config
    from lowrank_train.train.estimate import estimate_run

    recipe = REPO / "recipes/configs/llama_7b_qapollo_mini.yaml"
    assert main(["estimate", str(recipe), "--nproc", "8"]) == 0
    out = capsys.readouterr().out
    per_rank = estimate_run(load_config(recipe), nproc=8)
    assert "per rank of 8 (FSDP2)" in out and "kept whole on every rank" in out
    assert f"{per_rank.peak / 2**30:.3f}" in out
    assert per_rank.peak < estimate_run(load_config(recipe)).peak / 1.9
    plan = tmp_path / "fit.yaml"
    assert main(["estimate", str(recipe), "--fit", "6GiB", "--nproc", "8", "--plan-out", str(plan)]) == 0
    assert "--nproc 8" in plan.read_text() and "per rank" in plan.read_text()
    with pytest.raises(SystemExit):
        main(["estimate", str(recipe), "--nproc", "0"])
    assert "--nproc must be an integer >= 1, got '0'" in capsys.readouterr().err
