"""WeLore (Jaiswal et al., 2024): spectrum-driven low-rank compression of pretrained LLMs, and LRC fine-tuning.

Layout: ``spectrum`` (block linears, calibration statistics, cached singular values), ``sensitivity`` (each layer's
output sensitivity, the weights of loss-based allocation), ``generation`` (calibration text sampled from the model
itself), ``allocation`` (rank per matrix from a parameter budget, strategies by name), ``guard`` (the default's
held-out choice between allocations), ``compress`` (config, model conversion, trainable modes), ``io`` (save/load
without SVD, merge and dense export).
"""

from lowrank_train.welore.allocation import (
    GUARD_FALLBACK,
    GUARDED,
    STRATEGIES,
    Allocation,
    AllocationStrategy,
    allocate_by_loss,
    allocate_ranks,
    get_strategy,
    guard_candidates,
    is_low_rank_component,
    paper_tau,
    register_strategy,
    truncation_losses,
)
from lowrank_train.welore.compress import (
    TRAINABLE_MODES,
    CompressionReport,
    MatrixReport,
    WeLoreConfig,
    compress_model,
    mark_trainable,
)
from lowrank_train.welore.generation import generate_calibration, mix_generated_calibration
from lowrank_train.welore.guard import GuardReport, heldout_loss, split_calibration
from lowrank_train.welore.io import export_dense, load_compressed, lowrank_layers, merge_lowrank, save_compressed
from lowrank_train.welore.sensitivity import collect_calibration_statistics, collect_output_sensitivity
from lowrank_train.welore.spectrum import (
    collect_input_statistics,
    compute_spectra,
    find_block_linears,
    limit_threads,
    model_fingerprint,
    shrink_second_moment,
    whitening_factor,
)

__all__ = [
    "GUARDED",
    "GUARD_FALLBACK",
    "STRATEGIES",
    "TRAINABLE_MODES",
    "Allocation",
    "AllocationStrategy",
    "CompressionReport",
    "GuardReport",
    "MatrixReport",
    "WeLoreConfig",
    "allocate_by_loss",
    "allocate_ranks",
    "collect_calibration_statistics",
    "collect_input_statistics",
    "collect_output_sensitivity",
    "compress_model",
    "compute_spectra",
    "export_dense",
    "find_block_linears",
    "generate_calibration",
    "get_strategy",
    "guard_candidates",
    "heldout_loss",
    "is_low_rank_component",
    "limit_threads",
    "load_compressed",
    "lowrank_layers",
    "mark_trainable",
    "merge_lowrank",
    "mix_generated_calibration",
    "model_fingerprint",
    "paper_tau",
    "register_strategy",
    "save_compressed",
    "shrink_second_moment",
    "split_calibration",
    "truncation_losses",
    "whitening_factor",
]
