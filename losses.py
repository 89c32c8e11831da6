"""The training loss: every term and the objective that weighs them.

All the networks of model.py train on attribute-specific triplets (anchor, negative, positive) under
one attribute: the ranking loss of Ma et al., AAAI 2020 (Sec. 3.4, Eq. 6) on the embeddings'
similarities. Two networks add terms of their own:
  ASEN++ stage 2 (Dong et al., IEEE TIP 2021, Sec. III-D; Maryeon/asenpp, trainer.py): the local
    branch's triplet loss and the global-local alignment;
  CSN (Veit et al., CVPR 2017; andreasveit/conditional-similarity-networks, main.py), with
    --csn-reg: the L2 norm of the un-masked embeddings and the L1 norm of the masks.
`objective` is the whole sum, total = triplet + sum_k weight_k * term_k, the weights from the
configuration (LossWeights.of). A term reads the model.TripletOutput of the batch: the embeddings
(anchor, negative, positive, (N, D) each), their similarities and the networks' extra outputs, so a
new loss (InfoNCE with in-batch negatives, say) is one function here and one LossWeights field.
"""

if __name__ == '__main__':                       # run as a script: say what to run instead
    print('error: losses.py is a module, not a command; run python asen.py to train with the losses defined here', file=__import__('sys').stderr)
    raise SystemExit(2)
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

# CSN's regulariser weights (andreasveit/conditional-similarity-networks, main.py: --embed_loss 5e-3,
# --mask_loss 5e-4): the defaults of --csn-embed-weight and --csn-mask-weight, used with --csn-reg.
CSN_EMBED_WEIGHT, CSN_MASK_WEIGHT = 5e-3, 5e-4


class LossWeights(NamedTuple):
    """The margin and the weights of the objective's terms beside the triplet loss; a term of
    weight 0 is not computed. Field order is the order of the sum."""
    margin: float               # the triplet ranking margin (both triplet losses)
    local_triplet: float = 0.0  # ASEN++ stage 2: the local branch's triplet loss
    align: float = 0.0          # ASEN++ stage 2: global-local alignment
    csn_embed: float = 0.0      # CSN: L2 norm of the un-masked embeddings
    csn_mask: float = 0.0       # CSN: L1 norm of the masks

    @classmethod
    def of(cls, args, terms):
        """The weights the configuration `args` gives the terms a network feeds (`terms`, its
        EmbeddingNetwork.loss_terms); every other term weighs 0. CSN's regularisers weigh only
        with --csn-reg (the ASEN authors' CSN baseline has none)."""
        configured = {'local_triplet': args.local_weight, 'align': args.align_weight,
                      'csn_embed': args.csn_embed_weight if args.csn_reg else 0.0,
                      'csn_mask': args.csn_mask_weight if args.csn_reg else 0.0}
        return cls(args.margin, **{name: float(configured[name]) if name in terms else 0.0 for name in configured})

    def computed(self):
        """The names of the terms beside the triplet loss that `objective` computes, in the order of
        the sum: each pair that shares its inputs is computed whole when either weighs."""
        names = ()
        if self.local_triplet or self.align:
            names += ('local_triplet', 'align')
        if self.csn_embed or self.csn_mask:
            names += ('csn_embed', 'csn_mask')
        return names


# the terms beside the triplet loss, in the order of the sum (LossWeights' fields after the margin)
TERMS = LossWeights._fields[1:]


# ----------------------------------------------------------------------------- the terms

def triplet_loss(sim_an, sim_ap, margin):
    """The ranking loss (Ma et al., Eq. 6): (N,), (N,) -> the mean of max(0, s_an - s_ap + margin),
    as MarginRankingLoss with target -1 (the authors' code)."""
    target = torch.full_like(sim_an, -1.0)
    return F.margin_ranking_loss(sim_an, sim_ap, target, margin=margin)


def asenpp_local_terms(passes, margin):
    """ASEN++ stage 2's extra terms (Dong et al., TIP 2021, Sec. III-D; Maryeon/asenpp trainer.py)
    from the passes' {'global', 'local'} (N, D) embeddings, which hold anchor, negative, positive in
    that order: (the local branch's triplet loss on cosine similarities, the alignment: the sum over
    anchor, negative and positive of the batch mean of max(0, 1 - cos(global, local)))."""
    glob = torch.cat([p['global'] for p in passes]).float()                  # (3N, D)
    local = torch.cat([p['local'] for p in passes]).float()                  # (3N, D)
    g_a, g_n, g_p = glob.chunk(3)                                            # 3 x (N, D)
    l_a, l_n, l_p = local.chunk(3)
    cos = partial(F.cosine_similarity, dim=1)
    local_triplet = triplet_loss(cos(l_a, l_n), cos(l_a, l_p), margin)
    align = sum((1 - cos(g, loc)).clamp(min=0).mean() for g, loc in ((g_a, l_a), (g_n, l_n), (g_p, l_p)))
    return local_triplet, align


def csn_regularisers(passes):
    """CSN's regularisers (andreasveit/conditional-similarity-networks, main.py), each the mean over
    the forward passes of {'unmasked', 'mask'} (N, D): (the L2 norm of the un-masked embeddings /
    sqrt(N), the L1 norm of the masks / N)."""
    embed = torch.stack([p['unmasked'].float().norm(2) / p['unmasked'].shape[0] ** 0.5 for p in passes])
    mask = torch.stack([p['mask'].float().norm(1) / p['mask'].shape[0] for p in passes])
    return embed.mean(), mask.mean()


# ----------------------------------------------------------------------------- the objective

def objective(out, w):
    """The whole training loss of a batch (model.TripletOutput `out`, LossWeights `w`): returns
    (total, terms): the total that is minimised, triplet + sum_k w_k * term_k, and {name: 0-dim
    tensor} of the unweighted terms that were computed, 'triplet' first, then the weighing ones in
    the order of the sum."""
    computed = w.computed()
    terms = {'triplet': triplet_loss(out.sim_an, out.sim_ap, w.margin)}
    if 'local_triplet' in computed:
        terms['local_triplet'], terms['align'] = asenpp_local_terms(out.extras, w.margin)
    if 'csn_embed' in computed:
        terms['csn_embed'], terms['csn_mask'] = csn_regularisers(out.extras)
    weights = w._asdict()
    total = terms['triplet']
    for name, value in list(terms.items())[1:]:
        total = total + weights[name] * value
    return total, terms
