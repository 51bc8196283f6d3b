"""The seed's ResNet-like CIFAR-10 network (20,145,738 parameters at width 1.0).

    python model.py            # prints the layer table, parameters and MACs
    python model.py --width 0.25
"""
import argparse
from collections import OrderedDict

import torch
from torch import nn

# (name, out_channels) in network order; a residual block keeps the channel
# count, and every residual block is followed by a 2x2 max-pool.
STAGES = [
    ("conv0", 64), ("conv1", 128), ("residual_block0", 128),
    ("conv2", 256), ("conv3", 256), ("residual_block1", 256),
    ("conv4", 512), ("conv5", 512), ("residual_block2", 512),
    ("conv6", 512), ("conv7", 512), ("residual_block3", 512),
]


def conv3x3(in_channels, out_channels):
    """3x3, stride 1, padding 1, no bias: BatchNorm follows every conv."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """conv1-bn1-relu-conv2-bn2 plus the identity; (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class Net(nn.Module):
    """(N, 3, 32, 32) images -> (N, num_classes) logits."""

    def __init__(self, width=1.0, num_classes=10):
        super().__init__()
        layers = OrderedDict()
        in_channels = 3
        for name, channels in STAGES:
            channels = max(1, round(channels * width))
            if name.startswith("conv"):
                i = name[4:]
                layers[name] = conv3x3(in_channels, channels)
                layers[f"bn{i}"] = nn.BatchNorm2d(channels)
                layers[f"relu{i}"] = nn.ReLU(inplace=True)
            else:
                i = name[len("residual_block"):]
                layers[name] = ResidualBlock(channels)
                layers[f"pool{i}"] = nn.MaxPool2d(2)
            in_channels = channels
        self.backbone = nn.Sequential(layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def head(self, x):
        """(N, C, H, W) features -> (N, num_classes) logits."""
        return self.classifier(self.pool(x).flatten(1))

    def stages(self):
        """The forward pass as a list of callables; sensitivity.py reuses the prefix."""
        return [*self.backbone, self.head]

    def forward(self, x):
        for stage in self.stages():
            x = stage(x)
        return x


def build_model(width=1.0, num_classes=10):
    """The seed's network; `width` scales every channel count (1.0 = the seed)."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return Net(width, num_classes)


def build_model_from_checkpoint(ckpt):
    """The network a checkpoint dict describes: rebuilt from its config, weights loaded."""
    model = build_model(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model


def get_args_parser():
    from cli import width

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=width, default=1.0,
                        help="channel multiplier (default: %(default)s)")
    return parser


def main(args):
    from utils import MiB, get_model_macs, get_model_size, get_num_parameters

    model = build_model(args.width)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            print(f"{name:42s} {str(tuple(p.shape)):20s} {p.numel():>10,}")
    macs = get_model_macs(model, torch.randn(1, 3, 32, 32))
    print(f"parameters {get_num_parameters(model):,}  MACs {macs / 1e9:.2f} G  "
          f"size {get_model_size(model) / 8 / MiB:.2f} MiB (fp32)")


if __name__ == "__main__":
    from cli import cli

    cli(main, get_args_parser())
