"""Workaround for timm's Gemma4 ViT, which torch.fx cannot trace as it is (see docs/zoo.md).

``Gemma4VitEncoder.forward`` accepts raw images, pre-patchified NaFlex tensors and dicts, and branches on
``x.ndim`` and on ``padding_positions.any()``: control flow that symbolic tracing cannot follow, so auglocal-fx makes
the whole encoder a leaf and finds one unit. ``Gemma4ImageClassifier`` runs the same modules with the same weights
for dense ``(B, C, H, W)`` images only, without those branches; the patch grid it needs is computed from sizes
alone, so every local layer recomputes it and the model converts with one unit per block.

    python docs/examples/gemma4_vit.py      # about a minute on 2 CPU cores: random weights, 96x96 images

Run on this machine (timm 1.0.31): 18 units (patch embedding, rotary table, 16 blocks), outputs equal to the
unwrapped model within 1e-6, and one ``local_step`` with layers=6 gives every parameter a gradient.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

__all__ = ["Gemma4ImageClassifier", "patch_grid"]


@torch.fx.wrap  # one node in the traced graph whose inputs are sizes: a static value that every layer recomputes
def patch_grid(batch: int, rows: int, cols: int) -> torch.Tensor:
    """Gemma4's internal (x, y) coordinates of a dense ``rows x cols`` patch grid, shape (batch, rows * cols, 2)."""
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1).unsqueeze(0).expand(batch, -1, -1)


class Gemma4ImageClassifier(nn.Module):
    """A timm Gemma4 ViT (``gemma4_vit_*`` created with ``num_classes > 0``) restricted to dense images."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.naflexvit import batch_patchify

        encoder = self.model.encoder
        embed = encoder.patch_embed
        ph, pw = embed.patch_size
        positions = patch_grid(x.shape[0], x.shape[2] // ph, x.shape[3] // pw)
        x, _ = batch_patchify(x, (ph, pw), pad=False, channels_last=False)
        x = embed.input_proj(2 * (x - 0.5)) + embed._position_embeddings(positions, None)
        # The rotary module reads only the dtype and device of its first argument: a buffer keeps it static.
        cos, sin = encoder.rotary_emb(encoder.rotary_emb.inv_freq, positions)
        for block in encoder.blocks:
            x = block(x, cos, sin, attn_mask=None)
        x, _ = encoder.pooler(x, positions, None)
        return self.model.forward_head(x)


def main() -> None:
    import timm

    import auglocal_fx

    torch.manual_seed(0)
    model = timm.create_model("gemma4_vit_167m", num_classes=1000).eval()
    wrapped = Gemma4ImageClassifier(model).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        print(f"wrapper vs model, max abs difference: {(wrapped(x) - model(x)).abs().max().item():.2e}")
    local = auglocal_fx.convert(wrapped, layers=6, input_size=(3, 96, 96))
    print(local.summary() if hasattr(local, "summary") else local.plan)
    local.train()
    local.local_step(x, torch.randint(0, 1000, (2,)))
    missing = [n for n, p in local.named_parameters() if p.requires_grad and p.grad is None]
    print(f"parameters without a gradient after one local_step: {len(missing)}")


if __name__ == "__main__":
    main()
