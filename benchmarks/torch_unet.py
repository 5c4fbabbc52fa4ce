"""The tiny U-Net of fedjax_seg/models/unet.py in PyTorch, for the peers.

Same widths (16, 32, 64), GroupNorm (8 groups, eps 1e-6 like flax.nnx),
ReLU, max pooling, 2x2 stride-2 transposed convolutions, 1x1 head, the same
loss (soft Dice without background + mean pixel cross-entropy, per example)
and Flax's initialisation: 117,427 parameters for 1 channel and 3 classes,
as on our side. Used by `benchmarks/pfl_side.py` (pfl-research) and
`benchmarks/bench_vs_opacus.py` (Opacus). Imports only torch.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

WIDTHS = (16, 32, 64)
NUM_CLASSES = 3
EXPECTED_PARAMETERS = 117_427  # fedjax_seg's tiny U-Net, 1 channel, 3 classes
GROUPS = 8
GROUPNORM_EPS = 1e-6  # flax.nnx.GroupNorm's default
DICE_SMOOTH = 1e-5


# ---------------------------------------------------------------------------
# Model: the tiny U-Net of fedjax_seg/models/unet.py, in PyTorch.


class ConvBlock(nn.Module):
  """conv3x3 -> GroupNorm -> ReLU -> conv3x3 -> GroupNorm -> ReLU."""

  def __init__(self, in_ch: int, out_ch: int):
    super().__init__()
    groups = math.gcd(out_ch, GROUPS)
    self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=True)
    self.norm1 = nn.GroupNorm(groups, out_ch, eps=GROUPNORM_EPS, affine=True)
    self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=True)
    self.norm2 = nn.GroupNorm(groups, out_ch, eps=GROUPNORM_EPS, affine=True)

  def forward(self, x):
    h = F.relu(self.norm1(self.conv1(x)))
    return F.relu(self.norm2(self.conv2(h)))


class UNet(nn.Module):
  """U-Net on NCHW inputs; logits [B, classes, H, W]."""

  def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES,
               widths=WIDTHS):
    super().__init__()
    self.down = nn.ModuleList([
        ConvBlock(in_channels if i == 0 else widths[i - 1], w)
        for i, w in enumerate(widths)])
    levels = list(reversed(range(len(widths) - 1)))  # (1, 0) for 3 widths
    self.upconv = nn.ModuleList([
        nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
        for i in levels])
    self.up = nn.ModuleList([ConvBlock(2 * widths[i], widths[i])
                             for i in levels])
    self.head = nn.Conv2d(widths[0], num_classes, 1)

  def forward(self, x):
    skips = []
    h = x
    for i, block in enumerate(self.down):
      if i > 0:
        h = F.max_pool2d(h, 2)
      h = block(h)
      skips.append(h)
    for j, (upconv, block) in enumerate(zip(self.upconv, self.up)):
      h = torch.cat([upconv(h), skips[-2 - j]], dim=1)  # upsampled first
      h = block(h)
    return self.head(h)

  def example_losses(self, x, y):
    """[B] soft Dice (classes 1.., background excluded) + mean pixel CE."""
    return dice_ce_losses(self(x), y)


def dice_ce_losses(logits, y):
  """[B] soft Dice (classes 1.., background excluded) + mean pixel CE.

  logits [B, classes, H, W], y int64 [B, H, W]: fedjax_seg's
  `segmentation_task.example_loss`.
  """
  logits = logits.float()
  probs = torch.softmax(logits, dim=1)
  onehot = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
  intersection = (probs * onehot).sum(dim=(2, 3))
  total = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
  dice = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
  dice_loss = 1.0 - dice[:, 1:].mean(dim=1)
  ce = F.cross_entropy(logits, y, reduction="none").mean(dim=(1, 2))
  return dice_loss + ce


def flax_like_init_(net: nn.Module) -> None:
  """Flax's defaults: LeCun-normal (truncated) kernels, zero biases.

  fan_in is Flax's: kernel area * input channels, for the transposed
  convolutions too (torch stores their weight as [in, out, kh, kw]).
  GroupNorm keeps torch's (and Flax's) scale 1, bias 0.
  """
  for m in net.modules():
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
      w = m.weight
      area = w.shape[2] * w.shape[3]
      fan_in = area * (w.shape[0] if isinstance(m, nn.ConvTranspose2d)
                       else w.shape[1])
      # Std of a unit normal truncated to [-2, 2]: 0.87962566103423978.
      std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
      with torch.no_grad():
        nn.init.trunc_normal_(w, std=std, a=-2.0 * std, b=2.0 * std)
        if m.bias is not None:
          m.bias.zero_()


def count_parameters(net: nn.Module) -> int:
  return sum(p.numel() for p in net.parameters() if p.requires_grad)
