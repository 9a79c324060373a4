"""The official DIANet CIFAR models (gbup-group/DIANet models/cifar: dia_resnet.py,
dia_preresnet.py, dia_wrn.py, dia_resnext.py), re-created from reading them, for the tests of
accelerate and convert.

Kept as in the official files where it matters to code that matches or patches them: class names,
module names and registration order (it decides the state_dict's key order), the calling
conventions (ResNeXt calls its submodules through `.forward(x)`, bypassing `__call__` and hooks;
the Attention stages build their state with `torch.zeros(...).cuda()`: tests make `.cuda()` a no-op
on CPU), in-place ops (`x += org`, ReLU(inplace=True)), the LSTMCell's dropout on every cell's
output and the hard-coded LSTM widths of each file (so WRN works with widen factor 4 only, as
there).
Different: the weight initialisation (tests randomise weights) and the window of the final average
pool, `pool` (8 in the official files, for 32x32 images; tests use smaller images).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class small_cell(nn.Module):  # noqa: N801 (the official name; it appears in error messages)
    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(input_size, input_size // 4),
            nn.ReLU(inplace=True),
            nn.Linear(input_size // 4, 4 * hidden_size),
        )

    def forward(self, x):
        return self.seq(x)


class LSTMCell(nn.Module):
    def __init__(self, input_size, hidden_size, nlayers, dropout=0.1):
        super().__init__()
        self.nlayers = nlayers
        self.dropout = nn.Dropout(p=dropout)
        ih, hh = [], []
        for i in range(nlayers):
            if i == 0:
                ih.append(small_cell(input_size, hidden_size))
                hh.append(small_cell(hidden_size, hidden_size))
            else:
                ih.append(nn.Linear(hidden_size, 4 * hidden_size))
                hh.append(nn.Linear(hidden_size, 4 * hidden_size))
        self.w_ih = nn.ModuleList(ih)
        self.w_hh = nn.ModuleList(hh)

    def forward(self, input, hidden):
        hy, cy = [], []
        for i in range(self.nlayers):
            hx, cx = hidden[0][i], hidden[1][i]
            gates = self.w_ih[i](input) + self.w_hh[i](hx)
            i_gate, f_gate, c_gate, o_gate = gates.chunk(4, 1)
            i_gate = torch.sigmoid(i_gate)
            f_gate = torch.sigmoid(f_gate)
            c_gate = torch.tanh(c_gate)
            o_gate = torch.sigmoid(o_gate)
            ncx = (f_gate * cx) + (i_gate * c_gate)
            nhx = o_gate * torch.sigmoid(ncx)
            cy.append(ncx)
            hy.append(nhx)
            input = self.dropout(nhx)  # also after the last cell: a draw that changes nothing
        hy, cy = torch.stack(hy, 0), torch.stack(cy, 0)
        return hy, cy


class Attention(nn.Module):
    """The Attention stage of each file: `sizes` are the file's LSTM widths per block_idx, `relu`
    whether it applies its ReLU after the residual add (dia_resnet, dia_resnext), `nlayers` the
    LSTM cells (1 in every official file)."""

    def __init__(self, ModuleList, block_idx, sizes=(64, 128, 256), relu=True, nlayers=1):  # noqa
        super().__init__()
        self.ModuleList = ModuleList
        size = sizes[block_idx - 1]
        self.lstm = LSTMCell(size, size, nlayers)
        self.GlobalAvg = nn.AdaptiveAvgPool2d((1, 1))
        self.relu = nn.ReLU(inplace=True)
        self.block_idx = block_idx
        self.use_relu = relu
        self.nlayers = nlayers

    def forward(self, x):
        for idx, layer in enumerate(self.ModuleList):
            x, org = layer(x)
            seq = self.GlobalAvg(x)
            seq = seq.view(seq.size(0), seq.size(1))
            if idx == 0:
                ht = torch.zeros(self.nlayers, seq.size(0), seq.size(1)).cuda()
                ct = torch.zeros(self.nlayers, seq.size(0), seq.size(1)).cuda()
            ht, ct = self.lstm(seq, (ht, ct))
            x = x * (ht[-1].view(ht.size(1), ht.size(2), 1, 1))
            x += org
            if self.use_relu:
                x = self.relu(x)
        return x


# --- dia_resnet.py --------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.GlobalAvg = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return out, residual


class BasicBlock(nn.Module):
    """dia_resnet.py BasicBlock: returns (relu(out + residual), pooled), not (branch, residual)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.GlobalAvg = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        attention = self.GlobalAvg(out)
        out += residual
        return self.relu(out), attention


class ResNet(nn.Module):
    def __init__(self, depth, num_classes=1000, block_name="BasicBlock", pool=8):
        super().__init__()
        if block_name.lower() == "basicblock":
            n, block = (depth - 2) // 6, BasicBlock
        else:
            n, block = (depth - 2) // 9, Bottleneck
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        sizes = tuple(p * block.expansion for p in (16, 32, 64))
        self.layer1 = Attention(self._make_layer(block, 16, n), 1, sizes)
        self.layer2 = Attention(self._make_layer(block, 32, n, stride=2), 2, sizes)
        self.layer3 = Attention(self._make_layer(block, 64, n, stride=2), 3, sizes)
        self.avgpool = nn.AvgPool2d(pool)
        self.fc = nn.Linear(64 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes,
                    planes * block.expansion,
                    kernel_size=1,
                    stride=stride,
                    bias=False,
                ),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = nn.ModuleList([])
        layers.append(block(self.inplanes, planes, stride, downsample))
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return layers

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


# --- dia_preresnet.py -----------------------------------------------------------------------------


class PreBottleneck(nn.Module):
    """dia_preresnet.py Bottleneck (renamed below: both files name it Bottleneck)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.bn_additional = nn.BatchNorm2d(planes * 4)

    def forward(self, x):
        residual = x
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        out = self.bn_additional(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        return out, residual


PreBottleneck.__name__ = "Bottleneck"  # the official name; the qualified name stays (pickle)


class PreResNet(nn.Module):
    def __init__(self, depth, num_classes=1000, block_name="Bottleneck", pool=8):
        super().__init__()
        n, block = (depth - 2) // 9, PreBottleneck
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = Attention(self._make_layer(block, 16, n), 1, relu=False)
        self.layer2 = Attention(self._make_layer(block, 32, n, stride=2), 2, relu=False)
        self.layer3 = Attention(self._make_layer(block, 64, n, stride=2), 3, relu=False)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(pool)
        self.fc = nn.Linear(64 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes,
                    planes * block.expansion,
                    kernel_size=1,
                    stride=stride,
                    bias=False,
                )
            )
        layers = nn.ModuleList([])
        layers.append(block(self.inplanes, planes, stride, downsample))
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


# --- dia_wrn.py -----------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """dia_wrn.py BasicBlock (renamed below)."""

    def __init__(self, in_planes, out_planes, stride, dropRate=0.0):  # noqa: N803
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(
            in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            (not self.equalInOut)
            and nn.Conv2d(
                in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False
            )
            or None
        )
        self.bn_additional = nn.BatchNorm2d(out_planes)

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        out = self.bn_additional(out)
        if not self.equalInOut:
            x = self.convShortcut(x)
        return out, x


WideBasicBlock.__name__ = "BasicBlock"  # the official name; the qualified name stays (pickle)


class WideResNet(nn.Module):
    def __init__(self, depth, num_classes, widen_factor=1, dropRate=0.0, pool=8):  # noqa: N803
        super().__init__()
        n_channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        block = WideBasicBlock
        self.conv1 = nn.Conv2d(3, n_channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = Attention(
            self._make_layer(block, n_channels[0], n_channels[1], n, 1, dropRate), 1, relu=False
        )
        self.block2 = Attention(
            self._make_layer(block, n_channels[1], n_channels[2], n, 2, dropRate), 2, relu=False
        )
        self.block3 = Attention(
            self._make_layer(block, n_channels[2], n_channels[3], n, 2, dropRate), 3, relu=False
        )
        self.bn1 = nn.BatchNorm2d(n_channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(n_channels[3], num_classes)
        self.nChannels = n_channels[3]
        self.pool = pool

    def _make_layer(self, block, in_planes, out_planes, nb_layers, stride, dropRate):  # noqa: N803
        layers = nn.ModuleList([])
        for i in range(nb_layers):
            layers.append(
                block(
                    i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1, dropRate
                )
            )
        return layers

    def forward(self, x):
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, self.pool)
        out = out.view(-1, self.nChannels)
        return self.fc(out)


# --- dia_resnext.py -------------------------------------------------------------------------------


class ResNeXtAttention(Attention):
    """dia_resnext.py Attention: it also pools every block's output (unused)."""

    def forward(self, x):
        for idx, layer in enumerate(self.ModuleList):
            x, org = layer(x)
            seq = self.GlobalAvg(x)
            seq = seq.view(seq.size(0), seq.size(1))
            if idx == 0:
                ht = torch.zeros(1, seq.size(0), seq.size(1)).cuda()
                ct = torch.zeros(1, seq.size(0), seq.size(1)).cuda()
            ht, ct = self.lstm(seq, (ht, ct))
            x = x * (ht[-1].view(ht.size(1), ht.size(2), 1, 1))
            x += org
            x = self.relu(x)
            self.GlobalAvg(x)  # the official out_relu, computed and never used
        return x


ResNeXtAttention.__name__ = "Attention"  # the official name; the qualified name stays (pickle)


class ResNeXtBottleneck(nn.Module):
    def __init__(self, in_channels, out_channels, stride, cardinality, widen_factor):
        super().__init__()
        D = cardinality * out_channels // widen_factor  # noqa: N806
        self.conv_reduce = nn.Conv2d(in_channels, D, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_reduce = nn.BatchNorm2d(D)
        self.conv_conv = nn.Conv2d(
            D, D, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.bn = nn.BatchNorm2d(D)
        self.conv_expand = nn.Conv2d(
            D, out_channels, kernel_size=1, stride=1, padding=0, bias=False
        )
        self.bn_expand = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut.add_module(
                "shortcut_conv",
                nn.Conv2d(
                    in_channels, out_channels, kernel_size=1, stride=stride, padding=0, bias=False
                ),
            )
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(out_channels))

    def forward(self, x):  # every submodule through .forward: no hooks run
        bottleneck = self.conv_reduce.forward(x)
        bottleneck = F.relu(self.bn_reduce.forward(bottleneck), inplace=True)
        bottleneck = self.conv_conv.forward(bottleneck)
        bottleneck = F.relu(self.bn.forward(bottleneck), inplace=True)
        bottleneck = self.conv_expand.forward(bottleneck)
        bottleneck = self.bn_expand.forward(bottleneck)
        residual = self.shortcut.forward(x)
        return bottleneck, residual


class CifarResNeXt(nn.Module):
    def __init__(self, cardinality, depth, num_classes, widen_factor=4, dropRate=0, pool=8):  # noqa
        super().__init__()
        self.cardinality = cardinality
        self.depth = depth
        self.block_depth = (self.depth - 2) // 9
        self.widen_factor = widen_factor
        self.num_classes = num_classes
        self.output_size = 64
        self.stages = [32, 32 * self.widen_factor, 64 * self.widen_factor, 128 * self.widen_factor]
        self.pool = pool
        self.conv_1_3x3 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(32)
        sizes = (128, 256, 512)
        self.stage_1 = ResNeXtAttention(
            self.block("stage_1", self.stages[0], self.stages[1], 1), 1, sizes
        )
        self.stage_2 = ResNeXtAttention(
            self.block("stage_2", self.stages[1], self.stages[2], 2), 2, sizes
        )
        self.stage_3 = ResNeXtAttention(
            self.block("stage_3", self.stages[2], self.stages[3], 2), 3, sizes
        )
        self.classifier = nn.Linear(512, num_classes)

    def block(self, name, in_channels, out_channels, pool_stride=2):
        block = nn.ModuleList([])
        for bottleneck in range(self.block_depth):
            if bottleneck == 0:
                block.append(
                    ResNeXtBottleneck(
                        in_channels, out_channels, pool_stride, self.cardinality, self.widen_factor
                    )
                )
            else:
                block.append(
                    ResNeXtBottleneck(
                        out_channels, out_channels, 1, self.cardinality, self.widen_factor
                    )
                )
        return block

    def forward(self, x):
        x = self.conv_1_3x3.forward(x)
        x = F.relu(self.bn_1.forward(x), inplace=True)
        x = self.stage_1.forward(x)
        x = self.stage_2.forward(x)
        x = self.stage_3.forward(x)
        x = F.avg_pool2d(x, self.pool, 1)
        x = x.view(-1, 512)
        return self.classifier(x)


# name -> factory taking the final pool window: the paper's models, and tiny ones for quick tests
OFFICIAL_MODELS = {
    "resnet11": lambda pool: ResNet(11, 10, "Bottleneck", pool=pool),
    "preresnet11": lambda pool: PreResNet(11, 10, "Bottleneck", pool=pool),
    "wrn10_4": lambda pool: WideResNet(10, 10, 4, dropRate=0.3, pool=pool),
    "resnext11_2x64": lambda pool: CifarResNeXt(2, 11, 10, 4, pool=pool),
    "resnet56": lambda pool: ResNet(56, 100, "Bottleneck", pool=pool),
    "resnet164": lambda pool: ResNet(164, 100, "Bottleneck", pool=pool),
    "preresnet56": lambda pool: PreResNet(56, 100, "Bottleneck", pool=pool),
    "preresnet164": lambda pool: PreResNet(164, 100, "Bottleneck", pool=pool),
    "wrn16_4": lambda pool: WideResNet(16, 100, 4, dropRate=0.3, pool=pool),
    "wrn52_4": lambda pool: WideResNet(52, 100, 4, dropRate=0.3, pool=pool),
    "resnext29_8x32": lambda pool: CifarResNeXt(8, 29, 100, 4, pool=pool),
}
