"""The tiny in-memory dataset of the Trainer tests."""

import torch


class ArithmeticTokens(torch.utils.data.Dataset):
    """Token sequences ``start, start + 3, start + 6, ... (mod 256)``: a next-token rule a tiny model learns fast."""

    def __init__(self, size: int = 32, length: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, 256, (size,), generator=generator)
        self.ids = (starts[:, None] + 3 * torch.arange(length)) % 256

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}
