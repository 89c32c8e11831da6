"""The triplet ranking loss (losses.triplet_loss) and what TripletWrapper feeds it: mean over the batch
of max(0, s_an - s_ap + margin), s = <anchor, other> of the embeddings; with concat_forward the
three images go through one pass as [anchor; negative; positive]."""
import pytest
import torch

import losses
import model as models
from helpers import StandInNet


# s(a,n) - s(a,p) of six triplets, none at a kink of the hinge for the margins below: with margin 0
# two are active, with 0.2 three, with 1 five (the sixth, -1.5, stays inactive)
SIM_AN = [0.5, 0.1, 0.3, -0.6, 0.9, 0.0]
SIM_AP = [0.2, 0.8, 0.4, 0.9, 0.1, 0.5]


@pytest.mark.parametrize('margin, active', [(0.0, 2), (0.2, 3), (1.0, 5)])
def test_loss_is_eq6_averaged_over_the_batch(margin, active):
    """Eq. 6 of Ma et al.: L = max(0, m - s(a,p) + s(a,n)), the mean over the batch, written out
    triplet by triplet; its gradient is +1/N on s(a,n) and -1/N on s(a,p) of each triplet whose
    hinge is active, 0 where it is not."""
    per_triplet = [max(0.0, margin - ap + an) for an, ap in zip(SIM_AN, SIM_AP)]
    assert sum(value > 0 for value in per_triplet) == active          # both cases occur
    sim_an = torch.tensor(SIM_AN, requires_grad=True)
    sim_ap = torch.tensor(SIM_AP, requires_grad=True)
    loss = losses.triplet_loss(sim_an, sim_ap, margin)
    assert loss.item() == pytest.approx(sum(per_triplet) / len(per_triplet), abs=1e-6)
    loss.backward()
    n = len(per_triplet)
    assert sim_an.grad.tolist() == pytest.approx([1 / n if value > 0 else 0.0 for value in per_triplet])
    assert sim_ap.grad.tolist() == pytest.approx([-1 / n if value > 0 else 0.0 for value in per_triplet])


# ----------------------------------------------------------------------------- TripletWrapper

class Tagging(StandInNet):
    """An embedding net that returns each image's pixels (flattened) scaled by attribute + 1, and
    records the batches it sees."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images, attribute, norm=True):
        self.calls.append((images.shape[0], attribute.clone()))
        return images.flatten(1) * (attribute[:, None] + 1).float()


def triplet_batch():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(2, 1, 2, 2, generator=gen) for _ in range(3)]     # anchor, negative, positive


@pytest.mark.parametrize('concat', [False, True])
def test_tripletnet_returns_anchor_negative_then_anchor_positive(concat):
    anchor, negative, positive = triplet_batch()
    attr = torch.tensor([0, 2])
    net = Tagging()
    out = models.TripletWrapper(net, concat_forward=concat)(anchor, negative, positive, attr)
    sim_an, sim_ap = out.sim_an, out.sim_ap
    scale = (attr + 1).float() ** 2
    emb = [x.flatten(1) for x in (anchor, negative, positive)]
    assert torch.allclose(sim_an, (emb[0] * emb[1]).sum(1) * scale)
    assert torch.allclose(sim_ap, (emb[0] * emb[2]).sum(1) * scale)
    assert not torch.allclose(sim_an, sim_ap)
    if concat:   # one pass of 3N images, the attribute repeated per chunk
        assert len(net.calls) == 1 and net.calls[0][0] == 6
        assert net.calls[0][1].tolist() == [0, 2, 0, 2, 0, 2]
    else:
        assert [n for n, _ in net.calls] == [2, 2, 2]


def test_concat_forward_chunk_order_with_a_real_network():
    """ASENet in eval mode (BatchNorm statistics fixed): one concatenated pass gives the same
    similarities as three passes."""
    torch.manual_seed(0)
    net = models.build_model('ASENet', 3, 'resnet18', pretrained=False, dim_embed=8).eval()
    x = [torch.randn(2, 3, 48, 48) for _ in range(3)]
    attr = torch.tensor([0, 2])
    with torch.no_grad():
        separate = models.TripletWrapper(net)(*x, attr)
        joint = models.TripletWrapper(net, concat_forward=True)(*x, attr)
    for a, b in ((separate.sim_an, joint.sim_an), (separate.sim_ap, joint.sim_ap)):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(separate.sim_an, separate.sim_ap, atol=1e-3)


def test_three_passes_by_default_and_concat_chunks_a_batch_of_four():
    """The default is the original's three passes; one concatenated pass of 3N = 12 images splits
    back into three chunks of N = 4 (not four of 3)."""
    gen = torch.Generator().manual_seed(5)
    anchor, negative, positive = (torch.randn(4, 1, 2, 2, generator=gen) for _ in range(3))
    attr = torch.tensor([0, 1, 2, 0])
    net = Tagging()
    assert models.TripletWrapper(net).concat_forward is False
    separate = models.TripletWrapper(net)(anchor, negative, positive, attr)
    assert [n for n, _ in net.calls] == [4, 4, 4]
    joint = models.TripletWrapper(net, concat_forward=True)(anchor, negative, positive, attr)
    assert [n for n, _ in net.calls] == [4, 4, 4, 12]
    assert torch.allclose(separate.sim_an, joint.sim_an) and torch.allclose(separate.sim_ap, joint.sim_ap)


class HalfPrecision(StandInNet):
    """Embeddings in bfloat16, as a network under autocast returns them."""

    def forward(self, images, attribute, norm=True):
        return images.flatten(1).bfloat16()


@pytest.mark.parametrize('concat', [False, True])
def test_similarities_are_float32_products_of_the_embeddings(concat):
    """Under autocast the embeddings may be bf16: the similarities are computed in float32 (a bf16
    dot product of 64 terms loses about 3 digits)."""
    gen = torch.Generator().manual_seed(6)
    anchor, negative, positive = (torch.randn(3, 1, 8, 8, generator=gen) for _ in range(3))
    out = models.TripletWrapper(HalfPrecision(), concat_forward=concat)(anchor, negative, positive,
                                                                        torch.tensor([0, 1, 2]))
    emb = [x.flatten(1).bfloat16().float() for x in (anchor, negative, positive)]
    assert out.sim_an.dtype == out.sim_ap.dtype == torch.float32
    assert torch.allclose(out.sim_an, (emb[0] * emb[1]).sum(1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(out.sim_ap, (emb[0] * emb[2]).sum(1), rtol=1e-6, atol=1e-6)
    for got, want in zip((out.anchor, out.negative, out.positive), emb):      # the embeddings, float32
        assert got.dtype == torch.float32 and torch.equal(got, want)
