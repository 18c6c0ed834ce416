"""Small user-style models for the gate_ tests (ordinary PyTorch code, no gatedprune inside)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ResMLP(nn.Module):
    """MLP with pre-LayerNorm residual blocks: x = x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, d_in: int = 12, d: int = 16, hidden: int = 24, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        self.fc1 = nn.ModuleList([nn.Linear(d, hidden) for _ in range(depth)])
        self.fc2 = nn.ModuleList([nn.Linear(hidden, d) for _ in range(depth)])
        self.head = nn.Linear(d, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)  # (B, d)
        for ln, f1, f2 in zip(self.norms, self.fc1, self.fc2, strict=True):
            x = x + f2(F.gelu(f1(ln(x))))  # (B, d)
        return self.head(F.relu(x))


class PostNormMLP(nn.Module):
    """Residual MLP with post-LayerNorm: x = ln(x + fc2(relu(fc1(x))))."""

    def __init__(self, d: int = 10, hidden: int = 14, depth: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.ModuleList([nn.Linear(d, hidden) for _ in range(depth)])
        self.fc2 = nn.ModuleList([nn.Linear(hidden, d) for _ in range(depth)])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        for f1, f2, ln in zip(self.fc1, self.fc2, self.norms, strict=True):
            x = ln(x + f2(torch.relu(f1(x))))  # (B, d)
        return self.head(x)


def _conv(dims: int) -> type[nn.Conv1d] | type[nn.Conv2d]:
    return nn.Conv1d if dims == 1 else nn.Conv2d


def _bn(dims: int) -> type[nn.BatchNorm1d] | type[nn.BatchNorm2d]:
    return nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d


class BasicBlock(nn.Module):
    """torchvision-style basic block, 1D or 2D, optional projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dims: int = 1) -> None:
        super().__init__()
        conv, bn = _conv(dims), _bn(dims)
        self.conv1 = conv(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bn(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = bn(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(conv(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, C, *S)
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision-style bottleneck block (1x1, 3x3, 1x1), 1D or 2D; ``groups > 1`` makes the
    3x3 a grouped convolution (ResNeXt)."""

    def __init__(
        self, c_in: int, mid: int, c_out: int, stride: int = 1, dims: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        conv, bn = _conv(dims), _bn(dims)
        self.conv1 = conv(c_in, mid, 1, bias=False)
        self.bn1 = bn(mid)
        self.conv2 = conv(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = bn(mid)
        self.conv3 = conv(mid, c_out, 1, bias=False)
        self.bn3 = bn(c_out)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(conv(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Small ResNet over 1D (B, C, L) or 2D (B, C, H, W) inputs."""

    def __init__(
        self,
        dims: int = 1,
        bottleneck: bool = False,
        widths: tuple[int, ...] = (8, 12),
        groups: int = 1,
        mid_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        conv, bn = _conv(dims), _bn(dims)
        self.stem = nn.Sequential(conv(1, widths[0], 3, padding=1), bn(widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            for j in range(2):
                if bottleneck:
                    mid = int(w * mid_ratio)
                    blocks.append(Bottleneck(c, mid, w, stride if j == 0 else 1, dims, groups))
                else:
                    blocks.append(BasicBlock(c, w, stride if j == 0 else 1, dims))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGG(nn.Module):
    """Plain VGG-style CNN with a flatten into a two-layer classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(12 * 2 * 2, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class DenseBlockNet(nn.Module):
    """DenseNet-style: each layer's output is concatenated to its input (BN-ReLU-conv)."""

    def __init__(self, c0: int = 6, growth: int = 4, n_layers: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, c0, 3, padding=1)
        self.norms = nn.ModuleList()
        self.convs = nn.ModuleList()
        c = c0
        for _ in range(n_layers):
            self.norms.append(nn.BatchNorm1d(c))
            self.convs.append(nn.Conv1d(c, growth, 3, padding=1))
            c += growth
        self.head = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, c0, L)
        for bn, conv in zip(self.norms, self.convs, strict=True):
            x = torch.cat([x, conv(F.relu(bn(x)))], dim=1)  # (B, c + growth, L)
        return self.head(x.mean(dim=-1))


class MobileBlockNet(nn.Module):
    """MobileNet-style depthwise-separable blocks with an inverted residual."""

    def __init__(self, c: int = 8, expand: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU6())
        e = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
        self.sep = nn.Sequential(
            nn.Conv2d(c, 2 * c, 3, padding=1, groups=c), nn.ReLU(), nn.Conv2d(2 * c, c, 1)
        )
        self.head = nn.Linear(c, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))  # inverted residual
        x = self.sep(x)  # depthwise (multiplier 2) + pointwise
        return self.head(x.mean(dim=(2, 3)))


class TransformerClassifier(nn.Module):
    """Embedding Linear, nn.TransformerEncoder, mean pooling, Linear head."""

    def __init__(self, norm_first: bool = False, activation: str = "relu") -> None:
        super().__init__()
        d = 16
        self.embed = nn.Linear(3, d)
        layer = nn.TransformerEncoderLayer(
            d, 4, 24, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x))  # (B, T, d)
        return self.head(h.mean(dim=1))


class AttnBlock(nn.Module):
    """Pre-LN transformer block written by hand with nn.MultiheadAttention."""

    def __init__(self, d: int = 16, heads: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)  # (B, T, d)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    """Token embedding, two hand-written attention blocks, class token read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 16)
        self.blocks = nn.Sequential(AttnBlock(), AttnBlock())
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.blocks(self.embed(x)))  # (B, T, 16)
        return self.head(h[:, 0])


class LSTMClassifier(nn.Module):
    """Linear embedding, 2-layer batch-first LSTM, Linear head on the last time step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 10)
        self.lstm = nn.LSTM(10, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(F.relu(self.embed(x)))  # (B, T, 12)
        return self.head(out[:, -1])


class BiGRUClassifier(nn.Module):
    """Sequence-first bidirectional 2-layer GRU with inter-layer dropout, mean over time."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 10, num_layers=2, dropout=0.2, bidirectional=True)
        self.head = nn.Linear(20, 4)

    def forward(self, x: Tensor) -> Tensor:
        out = self.gru(x)[0]  # (T, B, 20)
        return self.head(out.mean(dim=0))


class StackedLSTM(nn.Module):
    """Two nn.LSTM modules one after the other (the second bidirectional), Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm1 = nn.LSTM(3, 10, batch_first=True)
        self.lstm2 = nn.LSTM(10, 8, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.lstm1(x)  # (B, T, 10)
        h, _ = self.lstm2(F.dropout(h, 0.1, self.training))  # (B, T, 16)
        return self.head(F.relu(h[:, -1]))


ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resmlp": (ResMLP, (4, 12)),
    "postnorm_mlp": (PostNormMLP, (4, 10)),
    "resnet1d_basic": (lambda: ResNet(1, False), (3, 1, 24)),
    "resnet1d_bottleneck": (lambda: ResNet(1, True), (3, 1, 24)),
    "resnet2d_basic": (lambda: ResNet(2, False), (2, 1, 8, 8)),
    "resnet2d_bottleneck": (lambda: ResNet(2, True), (2, 1, 8, 8)),
    # ResNeXt: grouped 3x3 convolutions, 4 groups (of 3 and 6 channels; of 2 and 4)
    "resnext1d": (lambda: ResNet(1, True, (8, 16), groups=4, mid_ratio=1.5), (3, 1, 24)),
    "resnext2d": (lambda: ResNet(2, True, (8, 16), groups=4, mid_ratio=1.0), (2, 1, 8, 8)),
    "vgg": (VGG, (3, 1, 8, 8)),
    "densenet": (DenseBlockNet, (3, 1, 20)),
    "mobilenet": (MobileBlockNet, (2, 1, 6, 6)),
    "transformer_postnorm": (TransformerClassifier, (3, 5, 3)),
    "transformer_prenorm_gelu": (lambda: TransformerClassifier(True, "gelu"), (3, 5, 3)),
    "transformer_tinyvit": (TinyViT, (3, 6, 3)),
    "lstm_classifier": (LSTMClassifier, (3, 5, 3)),
    "bigru_seqfirst": (BiGRUClassifier, (5, 3, 3)),
    "lstm_stacked": (StackedLSTM, (3, 5, 3)),
}


def randomise_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every norm layer non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm):
                m.weight.normal_(1.0, 0.3, generator=generator)
                m.bias.normal_(0.0, 0.3, generator=generator)
