"""Do a text encoder's states say which object of a shapes relation goes where? (docs/shapes-model.md)

The denoiser reads the caption through cross-attention into the encoder's per-token states and a
pooled vector. This trains two small readers on frozen states of train-split relation captions
("a red star left of a blue cross", "a blue cross with a red star left of it", ...) to name the
colour of the object on the left (for left / right) or on top (for above / below), and scores them
on held-out captions:
- a cross-attention reader: four learned queries attend over the tokens (as the denoiser's image
  tokens do, without any position of their own), then a linear layer;
- a linear reader of the pooled vector.
Chance is about one half (the other object's colour is the usual mistake). A reader near 100%
means the order is in what the denoiser is given, so a denoiser that ignores it has not learned to
use it; `latentdit eval binding` measures whether it has.

    python recipes/order_probe.py [--encoder minilm] [--steps 3000]
"""

from __future__ import annotations

import argparse
import random

import torch
from torch import nn

from latentdit.datasets.shapes import COLORS, ShapesDataset
from latentdit.text import load_text_encoder

_COLOUR_ID = {c: i for i, c in enumerate(COLORS)}


def captions(split: str, n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """n relation captions and the colour id of each scene's left / top object."""
    data = ShapesDataset(split=split, seed=seed, scenes=("relation",))
    texts, labels = [], []
    for i in range(n):
        attributes, caption, _ = data.draw(i)
        a, b = attributes["objects"][:2]
        first = a if attributes["relation"] in ("left of", "above") else b
        texts.append(caption)
        labels.append(_COLOUR_ID[first["color"]])
    return texts, torch.tensor(labels)


class TokenReader(nn.Module):
    def __init__(self, dim: int, width: int = 128, queries: int = 4) -> None:
        super().__init__()
        self.kv = nn.Linear(dim, 2 * width)
        self.queries = nn.Parameter(torch.randn(queries, width))
        self.out = nn.Linear(queries * width, len(COLORS))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(tokens).chunk(2, dim=-1)
        scores = torch.einsum("qd,bld->bql", self.queries, k) / k.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        return self.out(torch.einsum("bql,bld->bqd", weights, v).flatten(1))


class PooledReader(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, len(COLORS))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(pooled)


def accuracy(reader: nn.Module, states: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (reader(*states).argmax(-1) == labels).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--train", type=int, default=6000, help="train-split captions")
    p.add_argument("--test", type=int, default=1000, help="held-out captions")
    p.add_argument("--steps", type=int, default=3000)
    args = p.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    encoder = load_text_encoder(args.encoder, max_length=24)
    data = {}
    for split, n in (("train", args.train), ("heldout", args.test)):
        texts, labels = captions(split, n, seed=1)
        e = encoder.encode(texts)
        data[split] = ((e.tokens.float(), e.mask.bool(), e.pooled.float()), labels)
    dim, pooled_dim = data["train"][0][0].shape[-1], data["train"][0][2].shape[-1]
    for name, reader in (("cross-attention over the tokens", TokenReader(dim)),
                         ("linear on the pooled vector", PooledReader(pooled_dim))):
        opt = torch.optim.Adam(reader.parameters(), lr=1e-3)
        (states, labels), gen = data["train"], torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            i = torch.randint(0, len(labels), (128,), generator=gen)
            loss = nn.functional.cross_entropy(reader(*(s[i] for s in states)), labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{args.encoder}, {name}: left / top colour right in {accuracy(reader, *data['train']):.1%} of "
              f"train captions, {accuracy(reader, *data['heldout']):.1%} of held-out captions", flush=True)


if __name__ == "__main__":
    main()
