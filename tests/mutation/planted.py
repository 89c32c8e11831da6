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
 ('ASEN++ local triplet swaps close and far', 'losses.py', 'triplet_loss(cos(l_a, l_n), cos(l_a, l_p), margin)', 'triplet_loss(cos(l_a, l_p), cos(l_a, l_n), margin)', 'test_objective'),
 ('ASEN++ alignment pairs global positive with local negative', 'losses.py', 'g_a, g_n, g_p = glob.chunk(3)', 'g_a, g_p, g_n = glob.chunk(3)', 'test_objective'),
 ('CSN regularisers returned swapped', 'losses.py', 'return embed.mean(), mask.mean()', 'return mask.mean(), embed.mean()', 'test_objective'),
 ('CSN mask weight from --csn-embed-weight', 'losses.py', "'csn_mask': args.csn_mask_weight if", "'csn_mask': args.csn_embed_weight if", 'test_objective'),
 ('CSN regularisers weigh without --csn-reg', 'losses.py', "'csn_embed': args.csn_embed_weight if args.csn_reg else 0.0,", "'csn_embed': args.csn_embed_weight,", 'test_objective'),
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
 ('AP: no-relevant query left out of the mean', 'lib/evaluation.py', 'return float(aps.mean()) if aps.numel() else 0.0', 'return float(aps[aps > 0].mean()) if (aps > 0).any() else 0.0', 'test_metrics'),
 ('AP divides by the rank count, not R', 'lib/evaluation.py', 'precision_sum / n_relevant.clamp(min=1)', 'precision_sum / relevant.shape[1]', 'test_metrics'),
 ('ranking ascending', 'lib/evaluation.py', "return (keys.flip(1).view(int_type) & 1).bool()", "return (keys.view(int_type) & 1).bool()", 'test_metrics'),
 ('AP: hits counted from the wrong query', 'lib/evaluation.py', 'first[rows] + 1', 'first[cols] + 1', 'test_metrics'),
 ('AP: queries of the first chunk labelled for every chunk', 'lib/evaluation.py', 'q_gdtruth[start:start + chunk_size, None]', 'q_gdtruth[:chunk_size, None]', 'test_metrics'),
 ('ranking keeps the low bit (no tie-break mask)', 'lib/evaluation.py', 'keys = ((bits & ~1) | relevant', 'keys = ((bits) | relevant', 'test_metrics'),
 ('training accuracy counts the far one', 'lib/evaluation.py', 'return (sim_ap > sim_an).float().mean()', 'return (sim_an > sim_ap).float().mean()', 'test_zappos'),
 ('crop threshold inclusive', 'lib/crop.py', 'mask = level > math.floor(255 * threshold)', 'mask = level >= math.floor(255 * threshold)', 'test_crop'),
 ('crop square on the shorter side', 'lib/crop.py', 'side = torch.maximum(w, h)', 'side = torch.minimum(w, h)', 'test_crop'),
 ('crop square not centred', 'lib/crop.py', 'centre = start + length // 2', 'centre = start', 'test_crop'),
 ('StepLR gamma ignored', 'lib/commands.py', 'gamma=args.decay_rate)', 'gamma=1.0)', 'test_schedule'),
 ('ASEN++ global branch at the local rate', 'model.py', "'lr': lr_global}]", "}]", 'test_schedule'),
 ('model_best kept when worse', 'lib/preemption.py', 'is_best = prec > self.best_prec', 'is_best = True', 'test_checkpoints'),
 ('resume repeats the last epoch', 'lib/config.py', "int(checkpoint.get('epoch') or 0) + 1", "int(checkpoint.get('epoch') or 0) or 1", 'test_checkpoints'),
 # round 2 (issue 29): the evaluation protocol, triplet accuracy, ASEN++'s stage preparation, the pixel paths
 ('retrieval ranks each query against all candidates', 'lib/evaluation.py', 'c = np.flatnonzero(cand_entries[:, 1] == attr)', 'c = np.arange(len(cand_entries))', 'test_metrics'),
 ('retrieval score swaps queries and candidates', 'lib/evaluation.py', 'per, total = retrieval_map(query_emb, self.queries.entries, cand_emb, self.candidates.entries,', 'per, total = retrieval_map(cand_emb, self.candidates.entries, query_emb, self.queries.entries,', 'test_metrics'),
 ('MeanAP weighted by candidates', 'lib/evaluation.py', 'n_queries.append(len(q))', 'n_queries.append(len(c))', 'test_metrics'),
 ('per-attribute names out of order', 'lib/evaluation.py', 'self.candidates.entries,\n                                   len(self.attributes))\n        return Scores(dict(zip(self.attributes, per)), total)', 'self.candidates.entries,\n                                   len(self.attributes))\n        return Scores(dict(zip(self.attributes[::-1], per)), total)', 'test_metrics'),
 ('per-condition names out of order', 'lib/evaluation.py', '                                               len(self.attributes))\n        return Scores(dict(zip(self.attributes, per)), total)', '                                               len(self.attributes))\n        return Scores(dict(zip(self.attributes[::-1], per)), total)', 'test_zappos'),
 ('Random row draws the candidates first', 'lib/evaluation.py', 'rand_q = model.l2norm(torch.randn(query_emb.shape, generator=gen))\n        rand_c = model.l2norm(torch.randn(cand_emb.shape, generator=gen))', 'rand_c = model.l2norm(torch.randn(cand_emb.shape, generator=gen))\n        rand_q = model.l2norm(torch.randn(query_emb.shape, generator=gen))', 'test_metrics'),
 ('Random row ignores --seed', 'lib/evaluation.py', 'gen = torch.Generator().manual_seed(seed)', 'gen = torch.Generator()', 'test_metrics'),
 ('Random row of the trained candidates', 'lib/evaluation.py', 'rand_c = model.l2norm(torch.randn(cand_emb.shape, generator=gen))', 'rand_c = model.l2norm(cand_emb)', 'test_metrics'),
 ('Random row reports the per-attribute list', 'lib/evaluation.py', 'len(self.attributes))[1]\n\n\nclass', 'len(self.attributes))[0][0]\n\n\nclass', 'test_metrics'),
 ('percent record of the total as a fraction', 'lib/evaluation.py', 'evaluation.total_key: 100 * scores.total}', 'evaluation.total_key: scores.total}', 'test_metrics'),
 ('log lines without the epoch', 'lib/evaluation.py', "        logger.info(f'Train Epoch: {epoch}')\n", "        pass\n", 'test_metrics'),
 ('Zappos Random row of the trained embeddings', 'lib/evaluation.py', 'rand = model.l2norm(torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)))', 'rand = model.l2norm(emb)', 'test_zappos'),
 ('Zappos scores per condition swapped with rows', 'lib/evaluation.py', 'per, total = zappos.condition_accuracy(emb, self.eval_set.rows, self.eval_set.conditions,', 'per, total = zappos.condition_accuracy(emb, self.eval_set.rows[:, [0, 2, 1]], self.eval_set.conditions,', 'test_zappos'),
 ('triplet columns read as (anchor, close, far)', 'lib/zappos.py', 'anchor, far, close = (embeddings[rows[:, k]]', 'anchor, close, far = (embeddings[rows[:, k]]', 'test_zappos'),
 ('triplet accuracy in bf16', 'lib/zappos.py', 'embeddings[rows[:, k]].float() for k', 'embeddings[rows[:, k]] for k', 'test_zappos'),
 ('overall accuracy a plain mean of conditions', 'lib/zappos.py', 'float(correct.mean()) if len(correct) else 0.0', 'float(np.mean(per_condition)) if len(correct) else 0.0', 'test_zappos'),
 ('ASEN++ stage 2 keeps the stage-1 run name', 'lib/asenpp.py', "        draft.apply({'name': f'{draft.name}_s2'}, 'ASEN++ stage 2 of the --resume run')\n", '', 'test_asenpp'),
 ('ASEN++ stage 2 restarts from a stage-2 checkpoint', 'lib/asenpp.py', 'starts_stage2 = checkpoint is not None and draft.stage == 2 and file_stage == 1', 'starts_stage2 = checkpoint is not None and draft.stage == 2 and file_stage in (1, 2)', 'test_asenpp'),
 ('ASEN++ stage-2 checkpoint accepted with --stage 1', 'lib/asenpp.py', 'if checkpoint is not None and file_stage == 2 and draft.stage == 1:', 'if checkpoint is not None and file_stage == 2 and draft.stage == 2:', 'test_asenpp'),
 ('ASEN++ tests a stage-1 checkpoint as stage 2', 'lib/asenpp.py', '    if starts_stage2 and not training:\n', '    if False:\n', 'test_asenpp'),
 ('ASEN++ --cache-images allowed with the originals', 'lib/asenpp.py', 'if uses_originals(draft) and draft.cache_images:', 'if uses_originals(draft) and draft.cache_images and draft.stage == 1:', 'test_asenpp'),
 ('ASEN++ local size rounded up', 'lib/asenpp.py', 'max(args.img_size // 2, 1)', 'max((args.img_size + 1) // 2, 1)', 'test_asenpp'),
 ('ASEN++ local branch pretrained under --no-pretrained', 'lib/asenpp.py', 'local_pretrained=args.pretrained and local_imagenet', 'local_pretrained=local_imagenet', 'test_asenpp'),
 ('normalise divides by std before subtracting the mean', 'lib/gpuinput.py', 'return pixels.to(dtype).div_(scale).sub_(mean).div_(std)', 'return pixels.to(dtype).div_(scale).div_(std).sub_(mean)', 'test_gpuinput'),
 ('channels_last constants not interleaved', 'lib/gpuinput.py', 'mean.repeat(width).view(1, 1, width, 3)', 'mean.repeat_interleave(width).view(1, 1, width, 3)', 'test_gpuinput'),
 ('mirror flips upside down', 'lib/gpuinput.py', 'out[i] = pixels[i].flip(-1)', 'out[i] = pixels[i].flip(-2)', 'test_gpuinput'),
 ('triplet flips in row order', 'lib/gpuinput.py', 'None if flips is None else flips.flatten()', 'None if flips is None else flips.t().flatten()', 'test_gpuinput'),
 ('worker seed without its stream', 'lib/gpuinput.py', 'torch.manual_seed(task.base_seed + task.stream)', 'torch.manual_seed(task.base_seed)', 'test_gpuinput'),
 ('resumed pass replays no draws', 'lib/gpuinput.py', 'for _ in range(task.skip):', 'for _ in range(0):', 'test_gpuinput'),
 ('resumed pass counts draws per key, not per image', 'datasets.py', 'return len(keys) * self.images_per_key if self.flip_probability() else 0', 'return len(keys) if self.flip_probability() else 0', 'test_gpuinput'),
 ('start_at sticks to every later pass', 'lib/gpuinput.py', '        self.first_batch = 0\n        if self.device', '        if self.device', 'test_gpuinput'),
 ('loader draws from the global generator', 'lib/gpuinput.py', "pin_memory=self.device.type == 'cuda', generator=torch.Generator(),", "pin_memory=self.device.type == 'cuda',", 'test_gpuinput'),
 ('batch count drops a partial batch', 'lib/gpuinput.py', 'return -(-len(self.dataset) // self.batch_size)', 'return len(self.dataset) // self.batch_size', 'test_gpuinput'),
 ('make_loader ignores channels_last', 'lib/inputs.py', 'return gpuinput.DeviceLoader(dataset, batch_size, device, workers, channels_last, persistent)', 'return gpuinput.DeviceLoader(dataset, batch_size, device, workers, False, persistent)', 'test_gpuinput'),
 ('eval transform flips', 'datasets.py', '    if train:\n        steps.append(transforms.RandomHorizontalFlip())', '    if True:\n        steps.append(transforms.RandomHorizontalFlip())', 'test_gpuinput'),
 ('geometry crops before resizing', 'datasets.py', 'return transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size)])', 'return transforms.Compose([transforms.CenterCrop(img_size), transforms.Resize(img_size)])', 'test_gpuinput'),
 ('cached item flipped upside down', 'datasets.py', 'pixels = pixels[:, ::-1]', 'pixels = pixels[::-1]', 'test_imagecache'),
 ('to_normalized_tensor transposes the image', 'datasets.py', '.permute(2, 0, 1).contiguous()', '.permute(2, 1, 0).contiguous()', 'test_gpuinput'),
 ('triplet batch pixels in row order', 'datasets.py', 'pixels = self.uint8_pixels(rows[:, :3].T.reshape(-1))', 'pixels = self.uint8_pixels(rows[:, :3].reshape(-1))', 'test_gpuinput'),
 ('triplet batch flips not transposed', 'datasets.py', 'flips = flips.view(len(rows), 3).t().contiguous()', 'flips = flips.view(3, len(rows)).contiguous()', 'test_gpuinput'),
 ('transform_settings ignores the flip', 'datasets.py', '            flip = float(step.p)\n', '            pass\n', 'test_gpuinput'),
 ('partly cached batch: decoded images in the cached rows', 'datasets.py', 'for i in np.flatnonzero(~cached):', 'for i in np.flatnonzero(cached):', 'test_gpuinput'),
 ('image cache keeps unreadable images', 'lib/imagecache.py', '        self.row_of[np.asarray(list(uncached), dtype=np.int64)] = -1\n', '', 'test_imagecache'),
 ('cache key ignores modification times', 'lib/imagecache.py', "{image_id} {st.st_size} {st.st_mtime_ns}", "{image_id} {st.st_size}", 'test_imagecache'),
 ('cache of a short data file used', 'lib/imagecache.py', "and os.path.getsize(data_path) == len(ids) * size * size * 3", "and os.path.getsize(data_path) > 0", 'test_imagecache'),
 ('cache build moves the global RNG', 'lib/imagecache.py', 'batch_size=32, num_workers=workers,\n                                         generator=torch.Generator())', 'batch_size=32, num_workers=workers)', 'test_imagecache'),
 ('overwrite leaves the heatmaps in place', 'lib/runfolder.py', "RUN_EXTRA_FOLDERS = ('heatmaps', 'retrieval', 'retrieval_cache')", "RUN_EXTRA_FOLDERS = ('retrieval', 'retrieval_cache')", 'test_saved_files'),
 ('args.json with records taken for an attempt', 'lib/runfolder.py', "if held == ['args.json']:", "if 'args.json' in held:", 'test_run_rule'),
 ('test results compared by the path as typed', 'lib/runfolder.py', 'os.path.realpath(earlier) == os.path.realpath(args.resume)', 'earlier == args.resume', 'test_run_rule'),
 ('going back checked with swapped arguments', 'lib/runfolder.py', 'if not resumes_in(run_dir, args.resume) or args.overwrite:', 'if not resumes_in(args.resume, run_dir) or args.overwrite:', 'test_run_rule'),
 ('torn line not cut', 'lib/runfolder.py', '            handle.truncate(keep)\n', '', 'test_run_rule'),
 ('preemption: a step snapshot written without the finite check first', 'lib/preemption.py', '        check_finite()\n', '', 'test_robustness'),
 ('reproduce: a reader gone mid-table is an error', 'reproduce.py', "sys.stdout.fileno())\n        return 0", "sys.stdout.fileno())\n        return 1", 'test_reproduce'),
 ('inputs: every image scanned before training without --skip-bad-images', 'lib/inputs.py', "if getattr(args, 'skip_bad_images', False) and runtime.is_main_process():", 'if runtime.is_main_process():', 'test_datacheck'),
 ('inputs: --test may generate SynthFashion', 'lib/inputs.py', "return not (getattr(args, 'test', False) or ", 'return not (', 'test_bad_input_data'),
 ('preemption: the interval not restarted after a step snapshot', 'lib/preemption.py', '        self.restart()\n        if stop:', '        if stop:', 'test_preemption'),
 ('reproduce: stage 2 continued from stage 1 again', 'reproduce.py', '        train = continued(train)\n', '        pass\n', 'test_reproduce'),
 ('reproduce: a .trained mark without model_best taken as trained', 'reproduce.py', "if os.path.isfile(os.path.join(LOGS, f'{run}.trained')) and \\\n            os.path.isfile(os.path.join(folder, 'model_best.pth.tar')):", "if os.path.isfile(os.path.join(LOGS, f'{run}.trained')):", 'test_reproduce'),
 ('reproduce: difference as paper minus ours', 'reproduce.py', 'diff = {c: mean[c] - paper[c]', 'diff = {c: paper[c] - mean[c]', 'test_reproduce'),
 ('reproduce: the Random row left out', 'reproduce.py', "        rows.append(('Random', random))\n", '        pass\n', 'test_reproduce'),
 ('reproduce: the last signal named, not the first', 'reproduce.py', 'self.signal_name = self.signal_name or signal.Signals(number).name', 'self.signal_name = signal.Signals(number).name', 'test_reproduce'),
 ('checkpoints: newest snapshot by the order found', 'lib/checkpoints.py', '_, path, checkpoint = max(found, key=lambda item: item[0])', '_, path, checkpoint = found[-1]', 'test_checkpoints'),
 ("checkpoints: step snapshot keeps the RNGs of now, not the pass's", 'lib/checkpoints.py', "    state['rng'] = rng\n", '', 'test_checkpoints'),
 ('checkpoints: restore leaves the RNGs', 'lib/checkpoints.py', "    utils.set_rng_state(checkpoint['rng'])\n    return", '    return', 'test_checkpoints'),
 ('config: a checkpoint restores the invocation flags', 'lib/config.py', 'keep = draft.explicit | flags.INVOCATION_FLAGS', 'keep = draft.explicit', 'test_cli'),
 ('config: a checkpoint restores keys no flag has', 'lib/config.py', 'if key not in keep and key in vars(draft)}', 'if key not in keep}', 'test_cli'),
 ('config: a step snapshot outside runs/ named by its file alone', 'lib/config.py', "SNAPSHOT_STEMS = ('checkpoint', 'model_best', 'step', 'interrupted')", "SNAPSHOT_STEMS = ('checkpoint', 'model_best', 'interrupted')", 'test_test_folders'),
 ('flags: --epochs shapes the weights', 'lib/flags.py', "train('--epochs', role=KEPT,", "train('--epochs', role=RUN,", 'test_cli'),
 ('flags: the dataset not named first of the differences', 'lib/flags.py', "IDENTITY_FIRST = ('dataset', 'model', 'stage', 'backbone')", "IDENTITY_FIRST = ('model', 'stage', 'backbone')", 'test_cli'),
 ('flags: every flag counted as given', 'lib/flags.py', '    probe.set_defaults(**{dest: NOT_GIVEN for dest in probe.rules})\n', '', 'test_cli'),
 ("checkpoints: checking a file's RNG states leaves them set", 'lib/checkpoints.py', '    finally:\n        utils.set_rng_state(before)\n', '    finally:\n        pass\n', 'test_checkpoints'),
 ("checkpoints: ASEN++'s mAP left unchecked", 'lib/checkpoints.py', "for name in ('prec', 'best_prec', 'mAP'):", "for name in ('prec', 'best_prec'):", 'test_checkpoints'),
 ("checkpoints: the authors' ASEN++ file's weights looked for under state_dict", 'lib/checkpoints.py', "key = 'state_dict' if 'state_dict' in checkpoint or 'args' in checkpoint else 'model'", "key = 'state_dict'", 'test_checkpoints'),
 ("checkpoints: the authors' layer4 kept", 'lib/checkpoints.py', "ORIGINAL_UNUSED_BACKBONE = ('fc.', 'layer4.')", "ORIGINAL_UNUSED_BACKBONE = ('fc.',)", 'test_original_checkpoints'),
 ('checkpoints: attribute counts swapped in the mismatch line', 'lib/checkpoints.py', 'attribute count {in_file} in the file but {where}', 'attribute count {here} in the file but {where}', 'test_original_checkpoints'),
 ("checkpoints: ASEN++'s mAP not taken as prec", 'lib/checkpoints.py', "        checkpoint.setdefault('prec', checkpoint.get('mAP'))\n", '', 'test_asenpp'),
 ("checkpoints: stage 1 into stage 2 expects the local attention", 'lib/checkpoints.py', "    local = ('embeddingnet.local_backbone.', 'embeddingnet.local_attn.')", "    local = ('embeddingnet.local_backbone.',)", 'test_asenpp'),
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
