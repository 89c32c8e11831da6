"""The networks of the authors' code, re-written here to test that their checkpoints load.

Independent of model.py: written from the facts of Maryeon/asen (model.py: Tripletnet, ASENet,
ASENet_V2, ConditionalSimNet; resnet.py: a ResNet whose forward stops after layer3 but which keeps
an ImageNet `fc`), with the authors' module names so that `state_dict()` has their key layout.
Their code fixes the map at 14 x 14 and the channels at 1024 (ResNet-50 at 224 px); here both
follow the trunk, so that tiny ResNet-18 versions can be built.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class FeatureResNet(torchvision.models.ResNet):
    """torchvision ResNet whose forward ends after layer3; `fc` stays (unused), `layer4` is removed
    unless `keep_layer4` (a whole ResNet, as a CSN backbone may be)."""

    def __init__(self, depth=18, keep_layer4=False):
        block, layers = {18: (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
                         34: (torchvision.models.resnet.BasicBlock, [3, 4, 6, 3]),
                         50: (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])}[depth]
        super().__init__(block, layers)
        if not keep_layer4:
            del self.layer4
        self.channels = 256 * block.expansion

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class Tripletnet(nn.Module):
    def __init__(self, embeddingnet):
        super().__init__()
        self.embeddingnet = embeddingnet

    def forward(self, x, y, z, c):
        ex, ey, ez = (self.embeddingnet(t, c) for t in (x, y, z))
        return (ex * ey).sum(1), (ex * ez).sum(1)


def l2norm(x):
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


class ASENet(nn.Module):
    def __init__(self, backbonenet, embedding_size, n_attributes):
        super().__init__()
        c = backbonenet.channels
        self.backbonenet = backbonenet
        self.n_attributes = n_attributes
        self.mask_fc1 = nn.Linear(n_attributes, 512, bias=False)
        self.mask_fc2 = nn.Linear(n_attributes, c, bias=False)
        self.fc1 = nn.Linear(2 * c, 512)
        self.fc2 = nn.Linear(512, c)
        self.feature_fc = nn.Linear(c, embedding_size)
        self.conv1 = nn.Conv2d(c, 512, kernel_size=1, stride=1)
        self.conv2 = nn.Conv2d(512, 1, kernel_size=1, stride=1)

    def forward(self, x, c, norm=True):
        x = self.backbonenet(x)
        onehot = torch.zeros(c.size(0), self.n_attributes).scatter_(1, c.view(-1, 1), 1)
        # spatial attention
        img = torch.tanh(self.conv1(x))
        mask = torch.tanh(self.mask_fc1(onehot)).view(c.size(0), 512, 1, 1).expand_as(img)
        att = torch.tanh(self.conv2(mask * img))
        att = F.softmax(att.view(att.size(0), 1, -1), dim=2).view(att.size(0), 1, x.size(2), x.size(3))
        x = (x * att).view(x.size(0), x.size(1), -1).sum(dim=2)
        # channel attention
        mask = torch.cat((x, F.relu(self.mask_fc2(onehot))), dim=1)
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(mask))))
        x = self.feature_fc(x)
        return l2norm(x) if norm else x


class ASENet_V2(nn.Module):
    def __init__(self, backbonenet, embedding_size, n_attributes):
        super().__init__()
        c = backbonenet.channels
        self.backbonenet = backbonenet
        self.attr_embedding = nn.Embedding(n_attributes, 512)
        self.attr_transform1 = nn.Linear(512, 512)
        self.conv1 = nn.Conv2d(c, 512, kernel_size=1, stride=1)
        self.img_bn1 = nn.BatchNorm2d(512)
        self.attr_transform2 = nn.Linear(512, 512)
        self.fc1 = nn.Linear(c + 512, 512)
        self.fc2 = nn.Linear(512, c)

    def forward(self, x, c, norm=True):
        x = self.backbonenet(x)
        img = torch.tanh(self.img_bn1(self.conv1(x)))
        attr = torch.tanh(self.attr_transform1(self.attr_embedding(c)))
        attr = attr.view(attr.size(0), attr.size(1), 1, 1).expand_as(img)
        att = torch.sum(attr * img, dim=1, keepdim=True) / 512 ** 0.5
        att = F.softmax(att.view(att.size(0), 1, -1), dim=2).view(att.size(0), 1, x.size(2), x.size(3))
        x = (x * att).view(x.size(0), x.size(1), -1).sum(dim=2)
        attr = F.relu(self.attr_transform2(self.attr_embedding(c)))
        mask = torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat((x, attr), dim=1)))))
        x = x * mask
        return l2norm(x) if norm else x


class ConditionalSimNet(nn.Module):
    def __init__(self, embeddingnet, embedding_size, n_attributes):
        super().__init__()
        self.embeddingnet = embeddingnet
        self.embed_fc = nn.Linear(embeddingnet.channels, embedding_size)
        self.masks = nn.Embedding(n_attributes, embedding_size)
        self.masks.weight.data.normal_(0.9, 0.7)

    def forward(self, x, c, norm=True):
        x = self.embeddingnet(x)
        x = F.avg_pool2d(x, kernel_size=(x.size(2), x.size(3))).view(x.size(0), -1)
        x = self.embed_fc(x) * F.relu(self.masks(c))
        return l2norm(x) if norm else x


def randomise_batchnorm(net, seed=0):
    """Non-trivial BatchNorm statistics and affine weights, so eval mode is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def build(kind, n_attributes, dim_embed=16, depth=18, seed=0):
    """Tripletnet(kind) with a random init, in eval mode."""
    torch.manual_seed(seed)
    if kind == 'ASENet':
        net = ASENet(FeatureResNet(depth), dim_embed, n_attributes)
    elif kind == 'ASENet_V2':
        net = ASENet_V2(FeatureResNet(depth), dim_embed, n_attributes)
    elif kind == 'ConditionalSimNet':
        net = ConditionalSimNet(FeatureResNet(depth, keep_layer4=True), dim_embed, n_attributes)
    else:
        raise ValueError(kind)
    tnet = Tripletnet(net)
    with torch.no_grad():
        randomise_batchnorm(tnet, seed)
    return tnet.eval()


def save(tnet, path, epoch=7, prec=0.5, legacy=False):
    """The original code's checkpoint format; `legacy`: the pre-1.6 file format their PyTorch 1.1 wrote."""
    torch.save({'epoch': epoch, 'state_dict': tnet.state_dict(), 'prec': prec}, path,
               _use_new_zipfile_serialization=not legacy)
