"""DeepMask's heads: trunk features -> a mask embedding and an objectness score per window.

Shorthand: N images (or patches), C trunk channels, h x w a trunk feature map, f = the window
side in features (WINDOW_SIZE / stride, 10 in the release), h' = h - f + 1, w' = w - f + 1 the
window positions, E the embedding size (512), m the mask side (56), R selected windows.

    forward(features [N, C, h, w]) -> (embeddings [N, E, h', w'], score logits [N, h', w'])
    mask_logits(embeddings [R, E]) -> [R, m, m]

Every "linear" layer of the papers is stored as the convolution it becomes on a feature map:
a linear layer over an f x f window of features is an f x f convolution, one over a vector a
1 x 1 convolution. A patch (h = w = f) gives one position, the whole image's feature map gives
every window at the trunk's stride; both run the same weights, so the patch model and the
fully convolutional one cannot drift apart (the release converted its `nn.Linear`s into
convolutions for inference, `linear2convTrunk` / `linear2convHead` in modelUtils.lua). The
last linear, E -> m * m, runs only on the windows whose masks are wanted: `mask_logits` applies
the 1 x 1 convolution's weight, viewed as a matrix, to their embeddings.

`DeepMaskHead` is the released model (DeepMask.lua); `DeepMaskPaperHead` the NIPS 2015
paper's (its Figure 1), where the score branch max-pools 2 x 2 before its window layer: the
pool runs with stride 1 and the window layer dilated by 2, which is the stride-2 pool followed
by an f/2 x f/2 layer at every window position (a patch gives exactly the stride-2 result).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DeepMaskHead", "DeepMaskPaperHead"]


def _score_tail(embed_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """Dropout, E -> hidden (1 x 1), ReLU, dropout, hidden -> 1 (1 x 1): the release's score
    branch after its input vector."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Conv2d(embed_dim, hidden_dim, 1),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Conv2d(hidden_dim, 1, 1),
    )


class _MaskLayer(nn.Module):
    """The last linear layer of the mask branch, E -> m * m, as a 1 x 1 convolution."""

    def __init__(self, embed_dim: int, mask_size: int) -> None:
        super().__init__()
        self.mask_size = mask_size
        self.mask_pred = nn.Conv2d(embed_dim, mask_size * mask_size, 1)

    def mask_logits(self, embeddings: Tensor) -> Tensor:
        """embeddings [R, E] -> mask logits [R, m, m] (row-major, as the labels)."""
        weight = self.mask_pred.weight.flatten(1)  # a view [m * m, E]: no copy
        logits = F.linear(embeddings, weight, self.mask_pred.bias)
        return logits.view(-1, self.mask_size, self.mask_size)


def _check_sizes(in_channels: int, window: int, **sizes: int) -> None:
    if in_channels < 1 or window < 1 or min(sizes.values()) < 1:
        raise ValueError(
            f"DeepMask head sizes must be positive: in_channels={in_channels}, "
            f"window={window}, {sizes}"
        )


class DeepMaskHead(_MaskLayer):
    """The released DeepMask heads (DeepMask.lua).

    Shared: 1 x 1 conv C -> `shared_channels` (128) and ReLU, then an f x f "linear" layer to
    E (512) with no non-linearity: the embedding both branches read. Mask: E -> m * m (56 x
    56). Score: dropout, E -> `score_hidden_dim` (1024), ReLU, dropout, -> 1.

    Args:
        in_channels: C, channels of the trunk's feature map.
        window: f, the window side in features.
        shared_channels, embed_dim, mask_size, score_hidden_dim: see above.
        dropout: probability of both dropouts of the score branch (0.5).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        window: int,
        shared_channels: int = 128,
        embed_dim: int = 512,
        mask_size: int = 56,
        score_hidden_dim: int = 1024,
        dropout: float = 0.5,
    ) -> None:
        _check_sizes(
            in_channels,
            window,
            shared_channels=shared_channels,
            embed_dim=embed_dim,
            mask_size=mask_size,
            score_hidden_dim=score_hidden_dim,
        )
        super().__init__(embed_dim, mask_size)
        self.window = window
        self.shared = nn.Conv2d(in_channels, shared_channels, 1)
        self.embed = nn.Conv2d(shared_channels, embed_dim, window)
        self.score = _score_tail(embed_dim, score_hidden_dim, dropout)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features [N, C, h, w] (h, w >= f) -> (embeddings [N, E, h', w'], score logits
        [N, h', w'])."""
        embeddings = self.embed(F.relu(self.shared(features)))
        return embeddings, self.score(embeddings)[:, 0]


class DeepMaskPaperHead(_MaskLayer):
    """The heads of the DeepMask paper (NIPS 2015, Figure 1; VGG-A trunk, f = 14).

    Mask: 1 x 1 conv C -> `shared_channels` (512) and ReLU, an f x f linear layer to E (512),
    then E -> m * m. Score: 2 x 2 max pool, an f/2 x f/2 linear layer C -> E and ReLU, then
    the release's tail (dropout, E -> `score_hidden_dim` (1024), ReLU, dropout, -> 1).

    Args: as `DeepMaskHead`; `window` must be even.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        window: int,
        shared_channels: int = 512,
        embed_dim: int = 512,
        mask_size: int = 56,
        score_hidden_dim: int = 1024,
        dropout: float = 0.5,
    ) -> None:
        _check_sizes(
            in_channels,
            window,
            shared_channels=shared_channels,
            embed_dim=embed_dim,
            mask_size=mask_size,
            score_hidden_dim=score_hidden_dim,
        )
        if window % 2:
            raise ValueError(
                f"the paper's score branch pools 2 x 2, so the window in features must be "
                f"even; got {window} (MODEL.DEEPMASK.WINDOW_SIZE / the trunk's stride)"
            )
        super().__init__(embed_dim, mask_size)
        self.window = window
        self.shared = nn.Conv2d(in_channels, shared_channels, 1)
        self.embed = nn.Conv2d(shared_channels, embed_dim, window)
        self.score_embed = nn.Conv2d(in_channels, embed_dim, window // 2, dilation=2)
        self.score = _score_tail(embed_dim, score_hidden_dim, dropout)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features [N, C, h, w] (h, w >= f) -> (embeddings [N, E, h', w'], score logits
        [N, h', w'])."""
        embeddings = self.embed(F.relu(self.shared(features)))
        pooled = F.max_pool2d(features, kernel_size=2, stride=1)
        hidden = F.relu(self.score_embed(pooled))
        return embeddings, self.score(hidden)[:, 0]
