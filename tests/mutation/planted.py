"""Planted defects: each one a by-hand change to the product code that a test must catch. Applies
each in turn, runs the one test file whose subject it is, restores the file, prints CAUGHT/MISSED
and the failing test.

    python tests/mutation/planted.py [SUBSTRING ...]      # only the defects whose name contains one
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
D = [
 ('ASA softmax over channels', 'model.py', 'F.softmax(scores.reshape(n, 1, h * w), dim=2)', 'F.softmax(scores.reshape(n, 1, h * w), dim=1)', 'test_attention'),
 ('ASA no tanh on p_a', 'model.py', 'p_attr = torch.tanh(self.attr_proj(attr))', 'p_attr = (self.attr_proj(attr))', 'test_attention'),
 ('ASA no tanh on p_I', 'model.py', 'p_img = torch.tanh(p_img)', 'p_img = (p_img)', 'test_attention'),
 ('ASA no tanh on score', 'model.py', 'scores = torch.tanh(self.score(p_attr * p_img))', 'scores = (self.score(p_attr * p_img))', 'test_attention'),
 ('ASA attribute-blind (p_a = 1)', 'model.py', 'p_attr = torch.tanh(self.attr_proj(attr))[:, :, None, None]', 'p_attr = torch.ones_like(self.attr_proj(attr))[:, :, None, None]', 'test_attention'),
 ('ACA concat [q; pooled]', 'model.py', 'torch.cat([pooled, q], dim=1)', 'torch.cat([q, pooled], dim=1)', 'test_attention'),
 ('ACA no sigmoid', 'model.py', 'mask = torch.sigmoid(self.fc2(', 'mask = (self.fc2(', 'test_attention'),
 ('ACA no ReLU on q', 'model.py', 'q = F.relu(self.attr_proj(attr))', 'q = (self.attr_proj(attr))', 'test_attention'),
 ('noASA max pooling', 'model.py', 'pooled = feature_map.mean(dim=(2, 3))                            # (N, C)', 'pooled = feature_map.amax(dim=(2, 3))', 'test_attention'),
 ('noACA keeps the mask', 'model.py', 'self.aca = ChannelAttention(channels, n_attributes, channels, attr_bias=False) if use_aca else None', 'self.aca = ChannelAttention(channels, n_attributes, channels, attr_bias=False)', 'test_attention'),
 ('loss sign (target +1)', 'losses.py', 'target = torch.full_like(sim_an, -1.0)', 'target = torch.full_like(sim_an, 1.0)', 'test_loss'),
 ('loss swaps positive and negative', 'losses.py', 'F.margin_ranking_loss(sim_an, sim_ap, target', 'F.margin_ranking_loss(sim_ap, sim_an, target', 'test_loss'),
 ('loss ignores margin', 'losses.py', 'target, margin=margin)', 'target, margin=0.0)', 'test_loss'),
 ('TripletWrapper returns (ap, an)', 'model.py', 'TripletOutput(emb_a, emb_n, emb_p, (emb_a * emb_n).sum(dim=1), (emb_a * emb_p).sum(dim=1), passes)', 'TripletOutput(emb_a, emb_n, emb_p, (emb_a * emb_p).sum(dim=1), (emb_a * emb_n).sum(dim=1), passes)', 'test_loss'),
 ('concat chunk order a,p,n', 'model.py', 'emb_a, emb_n, emb_p = emb.chunk(3)  ', 'emb_a, emb_p, emb_n = emb.chunk(3)  ', 'test_loss'),
 ('concat attribute not repeated per chunk', 'model.py', 'attribute.repeat(3)', 'attribute.repeat_interleave(3)', 'test_loss'),
 ('distinct_pairs may repeat the anchor', 'datasets.py', 'positive += positive >= anchor', 'positive += positive > anchor', 'test_sampler'),
 ('distinct_pairs positive not uniform', 'datasets.py', 'positive = rng.integers(0, len(ids) - 1, n)', 'positive = (anchor + 1) % len(ids)', 'test_sampler'),
 ('attribute_draws skips the last attribute', 'datasets.py', 'rng.integers(0, len(usable_attributes), num_triplets)', 'rng.integers(0, max(len(usable_attributes) - 1, 1), num_triplets)', 'test_sampler'),
 ('TripletSampler negative of any value', 'datasets.py', 'others = all_ids[all_values != value]', 'others = all_ids', 'test_sampler'),
 ('TripletSampler negative uniform over values not entries', 'datasets.py', 'out[sel, 1] = others[rng.integers(0, len(others), len(sel))]', 'ov = all_values[all_values != value]; uv = np.unique(ov); pick = uv[rng.integers(0, len(uv), len(sel))]; out[sel, 1] = [rng.choice(others[ov == p]) for p in pick]', 'test_sampler'),
 ('ValuePairSampler second may equal first', 'lib/asenpp.py', 'other += other >= np.searchsorted(values, first)', 'other += other > np.searchsorted(values, first)', 'test_sampler'),
 ('ValuePairSampler negative weighted by images', 'lib/asenpp.py', 'second = values[other]', 'second = np.array([rng.choice(np.concatenate([groups[int(v)] * 0 + v for v in values if v != f])) for f in first])', 'test_sampler'),
 ('ConditionSampler not shuffled', 'lib/zappos.py', 'return out[rng.permutation(len(out))]', 'return out', 'test_sampler'),
 ('MeanAP plain mean of attributes', 'lib/evaluation.py', 'np.average(per_attribute, weights=n_queries)', 'np.average(per_attribute)', 'test_metrics'),
 ('AP: no-relevant query left out of the mean', 'utils.py', 'return float(aps.mean()) if aps.numel() else 0.0', 'return float(aps[aps > 0].mean()) if (aps > 0).any() else 0.0', 'test_metrics'),
 ('AP divides by the rank count, not R', 'utils.py', 'precision_sum / n_relevant.clamp(min=1)', 'precision_sum / relevant.shape[1]', 'test_metrics'),
 ('ranking ascending', 'utils.py', "return (keys.flip(1).view(int_type) & 1).bool()", "return (keys.view(int_type) & 1).bool()", 'test_metrics'),
 ('crop threshold inclusive', 'lib/crop.py', 'mask = level > math.floor(255 * threshold)', 'mask = level >= math.floor(255 * threshold)', 'test_crop'),
 ('crop square on the shorter side', 'lib/crop.py', 'side = torch.maximum(w, h)', 'side = torch.minimum(w, h)', 'test_crop'),
 ('crop square not centred', 'lib/crop.py', 'centre = start + length // 2', 'centre = start', 'test_crop'),
 ('StepLR gamma ignored', 'lib/commands.py', 'gamma=args.decay_rate)', 'gamma=1.0)', 'test_schedule'),
 ('ASEN++ global branch at the local rate', 'model.py', "'lr': lr_global}]", "}]", 'test_schedule'),
 ('model_best kept when worse', 'lib/commands.py', 'is_best = prec > best_prec', 'is_best = True', 'test_checkpoints'),
 ('resume repeats the last epoch', 'lib/config.py', "int(checkpoint.get('epoch') or 0) + 1", "int(checkpoint.get('epoch') or 0) or 1", 'test_checkpoints'),
]
only = sys.argv[1:]
for name, f, old, new, test in D:
    if only and not any(o in name for o in only):
        continue
    path = f'{ROOT}/{f}'
    src = open(path).read()
    assert src.count(old) >= 1, name
    if src.count(old) > 1: print("  (first of", src.count(old), ")")
    open(path, "w").write(src.replace(old, new, 1))
    try:
        r = subprocess.run([PY, '-m', 'pytest', '-q', '-x', '-n', '0', '-p', 'no:cacheprovider', f'tests/{test}.py'], cwd=ROOT,
                           capture_output=True, text=True)
    finally:
        open(path, 'w').write(src)
    failed = [l.split(' - ')[0].replace('FAILED ', '') for l in r.stdout.splitlines() if l.startswith('FAILED') or l.startswith('ERROR')]
    print(f'{"CAUGHT" if r.returncode else "MISSED"} | {name} | {f} | {failed}', flush=True)
