"""Fine-tuning a WeLore-compressed model through the loop: only the low-rank factors move."""

import torch

from lowrank_train.train import build_model, latest_checkpoint, load_config, load_state, train


def test_finetune_trains_only_the_low_rank_factors(tiny, tmp_path):
    from lowrank_train.welore import WeLoreConfig, compress_model, load_compressed, lowrank_layers, save_compressed

    shapes = load_config(None, [o for o in tiny if o.startswith(("model.", "data."))])
    torch.manual_seed(0)
    model, _ = build_model(shapes.model)
    report = compress_model(model, WeLoreConfig(target=0.3, strategy="welore"))
    assert report.num_lrc > 0
    folder = tmp_path / "compressed"
    save_compressed(model, folder)
    before = load_compressed(folder).state_dict()

    config = load_config(None, [*tiny, f"model.pretrained={folder}", "optimizer.name=adamw", "optimizer.lr=1e-2"])
    summary = train(config, mode="finetune", log=lambda line: None)
    assert summary["trainable_parameters"] < summary["parameters"]

    after = load_state(latest_checkpoint(config.run.output_dir))["model"]
    lowrank = set(lowrank_layers(load_compressed(folder)))
    changed = {name for name, tensor in before.items() if not torch.equal(after[name], tensor)}
    assert changed and all(any(name.startswith(f"{layer}.") for layer in lowrank) for name in changed), changed
    # the fine-tuned model is saved in the compressed format, ready to load
    reloaded = load_compressed(tmp_path / "run" / "model")
    assert set(lowrank_layers(reloaded)) == set(lowrank_layers(load_compressed(folder)))
