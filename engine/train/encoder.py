"""A small self-supervised image encoder (SimCLR-style contrastive learning) for packs built from scratch.

Two strongly augmented views of each image are pulled together and pushed away from every other image
of the batch (NT-Xent). The network is a timm ViT in the DINOv2 layout, so the pack treats it exactly
like a public DINOv2 checkpoint; the projection head is thrown away and the backbone's output (the mean
of the normed patch tokens by default) is the representation, "before projection" as in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synthgen.models.encoder import EncoderSpec, ImageEncoder, build_encoder_module
from synthgen.train.augment import ssl_view
from synthgen.train.data import ImageSet, to_unit
from synthgen.train.optim import warmup_cosine


@dataclass(frozen=True)
class EncoderTrainConfig:
    image_size: int = 16
    patch_size: int = 4
    dim: int = 96
    depth: int = 4
    heads: int = 3
    steps: int = 800
    batch: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.05
    temperature: float = 0.1
    embedding: str = "mean"  # patch-token mean: learns faster than CLS at this scale (k-NN 0.73 vs 0.51 @300 steps)
    proj_dim: int = 128
    seed: int = 0

    def spec(self) -> EncoderSpec:
        kwargs = dict(patch_size=self.patch_size, embed_dim=self.dim, depth=self.depth, num_heads=self.heads,
                      init_values=None)  # no LayerScale: a 4-block net trains faster without the 1e-5 gate
        return EncoderSpec(model="vit_small_patch14_dinov2", dim=self.dim, resize=self.image_size,
                           crop=self.image_size, embedding=self.embedding, kwargs=kwargs)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive loss of two views: (B, P), (B, P) -> scalar. Positives are the matching rows."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, P)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # an image is not its own negative
    b = z1.shape[0]
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, targets)


def train_encoder(data: ImageSet, config: EncoderTrainConfig, progress: bool = True) -> tuple[ImageEncoder, list]:
    """Returns the trained encoder (eval mode, with its spec) and the loss history."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    spec = config.spec()
    encoder = ImageEncoder(spec, build_encoder_module(spec))
    head = nn.Sequential(nn.Linear(spec.dim, 256), nn.GELU(), nn.Linear(256, config.proj_dim))
    params = list(encoder.net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = warmup_cosine(opt, warmup=max(1, config.steps // 20), total=config.steps)
    x_all = to_unit(data.images)
    history = []
    encoder.train()
    bar = tqdm(range(config.steps), desc="train encoder", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(data), (min(config.batch, len(data)),), generator=gen)
        x = x_all[idx]
        views = [encoder(ssl_view(x, gen)) for _ in range(2)]  # (B, D) each
        loss = nt_xent(head(views[0]), head(views[1]), config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == config.steps - 1:
            history.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return encoder.eval().requires_grad_(False), history


@torch.inference_mode()
def embed_set(encoder: ImageEncoder, data: ImageSet, batch: int = 512) -> torch.Tensor:
    """(N, D) float32 embeddings of an in-memory image set."""
    return torch.cat([encoder(to_unit(data.images[i : i + batch])) for i in range(0, len(data), batch)])


def knn_accuracy(train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 5) -> float:
    """Cosine k-NN top-1: the standard quick probe of a self-supervised representation."""
    sims = F.normalize(test_emb, dim=1) @ F.normalize(train_emb, dim=1).T
    neighbours = train_labels[sims.topk(k, dim=1).indices]  # (M, k)
    votes = F.one_hot(neighbours, int(train_labels.max()) + 1).sum(dim=1)
    return float((votes.argmax(dim=1) == test_labels).float().mean())
