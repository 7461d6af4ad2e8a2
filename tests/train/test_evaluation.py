"""Held-out evaluation shared by several processes equals the one-process evaluation of the global batches."""

import pytest
import torch
from torch import nn

from lowrank_train.train.evaluation import evaluate


class _TinyLM(nn.Module):
    """An embedding and a head: enough for a loss that depends on every row."""

    def __init__(self, vocab: int = 17):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)
        self.forwards = 0

    def forward(self, input_ids, labels):
        self.forwards += 1
        logits = self.head(self.embed(input_ids))[:, :-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return type("Output", (), {"loss": loss})()


@pytest.mark.parametrize(("blocks", "world_size"), [(8, 2), (9, 2), (5, 4), (7, 3)])
def test_shared_evaluation_equals_one_process(blocks, world_size):
    data = torch.randint(0, 17, (blocks, 6), generator=torch.Generator().manual_seed(blocks))
    model = _TinyLM()
    expected = evaluate(model, data, 4, 0, torch.device("cpu"))
    partial, forwards = [], []

    def keep(tensor):
        partial.append(tensor)
        return tensor

    for rank in range(world_size):  # each process's partial (loss sum, token count), as its all_sum receives it
        model.forwards = 0
        evaluate(model, data, 4, 0, torch.device("cpu"), rank=rank, world_size=world_size, all_sum=keep)
        forwards.append(model.forwards)
    # Every process ran the same number of forwards (an empty share runs one unweighted row).
    assert forwards == [-(-blocks // 4)] * world_size
    total = torch.stack(partial).sum(dim=0)
    assert int(total[1]) == blocks * 5
    assert float(total[0] / total[1]) == pytest.approx(expected, rel=1e-6)  # float32 means of other row sets


def test_several_processes_need_a_sum():
    with pytest.raises(ValueError, match="all_sum"):
        evaluate(_TinyLM(), torch.zeros(4, 6, dtype=torch.long), 4, 0, torch.device("cpu"), rank=0, world_size=2)
