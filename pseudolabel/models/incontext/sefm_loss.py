"""SeFM's training loss: L1 plus an adversarial term from a component-type discriminator.

The discriminator ``ComponentDiscriminator`` looks at an image (the answer cell: the network's clean
query, or the true one) and gives, for each of ``NUM_COMPONENT_TYPES`` (20) component types, the
probability that a component of that type is still in the image. One training step:

1. discriminator (its own Adam): ``BCE(D(target), 0) + BCE(D(output.detach()), types)`` — the true
   clean image holds none of the types to remove; the network's output is labelled with the
   multi-hot vector ``types`` of the type(s) it had to remove;
2. network: ``L1(output, target) + 0.3 · BCE(D(output), 0)`` with the just-updated discriminator —
   the output should look as if nothing of those types were left.

BCE is the mean over the batch and the 20 types of −[y·log p + (1 − y)·log(1 − p)] (each log
clamped at −100). ``output`` and ``target`` are (B, 3, cell, cell) in [0, 1].

The discriminator is eight 4×4 convs without bias — ``input_pro`` (stride 1, padding 2), six of
stride 2 (padding 2) and one of stride 4 (no padding), each but the first followed by LeakyReLU 0.2 —
with 32, 32, 64, 128, 256, 256, 512, 512 channels (``ndf`` = 32), then a 1×1 conv to 20 logits and a
sigmoid; weights drawn from N(0, 0.02). A 256×256 input leaves the stride-4 conv as a 1×1 map
(256 → 257 → 129 → 65 → 33 → 17 → 9 → 5 → 1), i.e. exactly one prediction per type. Other sizes: a final map
smaller than the last layer's 4×4 kernel is zero-padded to it, and when the last layer gives more than
one position its logits are averaged over positions before the sigmoid (identical at 256×256).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: outputs of the discriminator: one per component type
NUM_COMPONENT_TYPES = 20
#: weight of the adversarial term in the network's loss
ADVERSARIAL_WEIGHT = 0.3


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=2, bias=False), nn.LeakyReLU(0.2, inplace=True))


class ComponentDiscriminator(nn.Module):
    """(B, in_channels, H, W) -> (B, types) probabilities that each component type remains."""

    def __init__(self, ndf: int = 32, in_channels: int = 3, types: int = NUM_COMPONENT_TYPES):
        super().__init__()
        self.input_pro = nn.Conv2d(in_channels, ndf, 4, stride=1, padding=2, bias=False)
        self.layer1 = _down(ndf, ndf)
        self.layer2 = _down(ndf, ndf * 2)
        self.layer3 = _down(ndf * 2, ndf * 4)
        self.layer4 = _down(ndf * 4, ndf * 8)
        self.layer5 = _down(ndf * 8, ndf * 8)
        self.layer6 = _down(ndf * 8, ndf * 16)
        self.layer7 = nn.Sequential(nn.Conv2d(ndf * 16, ndf * 16, 4, stride=4, padding=0, bias=False),
                                    nn.LeakyReLU(0.2, inplace=True),
                                    nn.Conv2d(ndf * 16, types, 1, bias=False),
                                    nn.Sigmoid())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, types) logits."""
        h = self.input_pro(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5, self.layer6):
            h = layer(h)
        ph, pw = max(0, 4 - h.shape[-2]), max(0, 4 - h.shape[-1])
        if ph or pw:
            h = F.pad(h, (0, pw, 0, ph))
        h = self.layer7[1](self.layer7[0](h))
        return self.layer7[2](h).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer7[3](self.logits(x))


def bce(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of probabilities (``torch.nn.BCELoss``)."""
    return F.binary_cross_entropy(probs, targets)


def discriminator_loss(disc: nn.Module, output: torch.Tensor, target: torch.Tensor,
                       types: torch.Tensor) -> torch.Tensor:
    """BCE(D(target), 0) + BCE(D(output), types); ``output`` is detached here.

    Args:
        output, target: (B, 3, H, W) network output and clean ground truth.
        types: (B, types) float multi-hot of the component type(s) removed in each example.
    """
    on_target = disc(target)
    return bce(on_target, torch.zeros_like(on_target)) + bce(disc(output.detach()), types.to(on_target.dtype))


def sefm_loss(output: torch.Tensor, target: torch.Tensor, disc_probs: torch.Tensor | None = None,
              adversarial_weight: float = ADVERSARIAL_WEIGHT, mask: torch.Tensor | None = None,
              component_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The network's loss: L1(output, target) + adversarial_weight · BCE(disc_probs, 0).

    Args:
        output, target: (B, 3, H, W).
        disc_probs: (B, types) = D(output) (not detached), or None for plain L1.
        mask, component_weight: optional per-pixel L1 weight 1 + component_weight · mask
            (mask (B, 1, H, W) in [0, 1]); 0 (default) is the plain mean L1.

    Returns:
        (total, {"l1": ..., "adv": ...}), all 0-d tensors (``adv`` is 0 without ``disc_probs``).
    """
    err = (output - target).abs()
    if mask is not None and component_weight > 0:
        err = err * (1.0 + component_weight * mask)
    l1 = err.mean()
    if disc_probs is None or adversarial_weight == 0:
        adv = l1.new_zeros(())
    else:
        adv = bce(disc_probs, torch.zeros_like(disc_probs))
    return l1 + adversarial_weight * adv, {"l1": l1, "adv": adv}
