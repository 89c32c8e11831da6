"""The report of a trained model: runs/<name>/report/index.html and the pictures it links.

    python asen.py --report --resume runs/<name>/model_best.pth.tar
    python asen.py --test --report --resume runs/<name>/model_best.pth.tar   # test_results.json too

One folder that opens offline in any browser, without JavaScript: the run (model, data, checkpoint,
settings, the command that trains it again), the test results beside the Random row and the
paper's figure, the training curves of metrics.jsonl, and per attribute its attention, retrieval
examples, a t-SNE map of its embedding space and the AP of each of its values.

The test split is embedded once, by commands.test (the same embeddings --test scores); everything
here is computed from them. matplotlib and scikit-learn are imported inside the functions that draw
(`_pyplot`, `tsne_map`), so training and --test without --report never load them.
"""

import html
import json
import os
import shutil
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

import utils
from lib import analysis, evaluation, flags, runfolder, visualize
from lib.images import load_image
from utils import UserError

REPORT_DIR = 'report'
RECORD = 'report.json'          # in the report folder: which checkpoint it shows, and its numbers
ATTENTION_IMAGES = 4            # test images per attribute whose attention is drawn
RETRIEVAL_TOPK = 5              # candidates shown per retrieval example
TSNE_POINTS = 500               # the t-SNE sample per attribute: its cost grows with the points
TSNE_MIN_POINTS = 5             # fewer make no map
TILE = 96                       # pixels of a retrieval tile
# Left out of the command line that retrains the run: the flags of an invocation (their role in
# lib/flags.py), and the evaluation's batch size, which changes no weight.
NOT_TRAINING = flags.INVOCATION_FLAGS | {'eval_batch_size'}


# ----------------------------------------------------------------------------- what the network can show

def spatial_attention(net):
    """The network's attention-map function (images, attributes) -> (N, h, w), or None when it has
    no spatial attention. The one place that reads this ability of model.py's networks."""
    return net.attention_maps if net.has_spatial_attention else None


# ----------------------------------------------------------------------------- where the report comes from

class Source(NamedTuple):
    """What the report says of the checkpoint: its path, epoch and validation score, the settings
    saved in it, whether the authors' code wrote it, and the command line that trains it."""
    checkpoint: str
    epoch: object
    validation: object
    saved_args: dict
    original: bool
    command: str

    @classmethod
    def of(cls, resolved, parser):
        """From config.resolve_configuration's result and asen.py's parser (flags.get_args_parser)."""
        checkpoint = resolved.checkpoint or {}
        saved = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
        original = resolved.original is not None
        command = '' if original or not saved else command_line(saved, parser)
        return cls(resolved.args.resume, checkpoint.get('epoch'), checkpoint.get('prec', checkpoint.get('mAP')),
                   saved, original, command)


def command_line(saved, parser):
    """`python asen.py FLAGS` with every training setting of `saved` that differs from the parser's
    default: what trains the same run again (an ASEN++ stage 2 also needs its stage-1 --resume)."""
    parts = ['python', 'asen.py']
    for dest, rule in parser.rules.items():
        if dest in NOT_TRAINING or dest not in saved:
            continue
        value, flag = saved[dest], rule.option
        if value == parser.get_default(dest):
            continue
        if rule.negatable:
            parts.append(flag if value else '--no-' + flag[2:])
        elif rule.kind == 'bool':                       # a switch: store_true
            parts += [flag] if value else []
        elif value is not None:
            parts += [flag, str(value)]
    return ' '.join(parts)


# ----------------------------------------------------------------------------- checks before the work

class Plan(NamedTuple):
    run_dir: str
    report_dir: str
    metrics: str            # metrics.jsonl to draw, or '' for an authors' checkpoint


def prepare(run_dir, args, source):
    """Refuse, before the test split is embedded, what would make a wrong or lost report: a
    checkpoint of another dataset, a run without metrics.jsonl, a report folder of another run."""
    saved_dataset = source.saved_args.get('dataset')
    if saved_dataset and saved_dataset != args.dataset:
        raise UserError(f"--resume {source.checkpoint} is a checkpoint of {saved_dataset}, not of --dataset "
                        f"{args.dataset}; drop --dataset (the checkpoint's is used) or report a {args.dataset} model")
    metrics = ''
    if not source.original:
        folder = os.path.dirname(os.path.abspath(source.checkpoint))
        metrics = os.path.join(folder, 'metrics.jsonl')
        if not os.path.isfile(metrics):
            raise UserError(f"{os.path.join(os.path.dirname(source.checkpoint), 'metrics.jsonl')}: not found; the "
                            f"report's training curves need the run's record: give --resume a snapshot in its own "
                            f"run folder (runs/<name>/model_best.pth.tar)")
    report_dir = os.path.join(run_dir, REPORT_DIR)
    check_replaceable(report_dir, run_dir, source.checkpoint, args.overwrite)
    return Plan(run_dir, report_dir, metrics)


def check_replaceable(report_dir, run_dir, checkpoint, overwrite):
    """A report replaces only an earlier report of the same run: of the same checkpoint file, or of a
    snapshot of this run folder (--overwrite moves another aside)."""
    if os.path.lexists(report_dir) and not os.path.isdir(report_dir):
        raise UserError(f"{report_dir} exists and is not a folder; move it away or choose another --name")
    if not os.path.isdir(report_dir):
        return
    earlier = reported_checkpoint(report_dir)
    if earlier and same_run(earlier, checkpoint, run_dir):
        return
    if overwrite:
        return
    of = f"of {earlier}" if earlier else "of something else (no readable report.json)"
    raise UserError(f"{report_dir} holds the report {of}, not of --resume {checkpoint}; choose another --name, "
                    f"or pass --overwrite to move the earlier report aside")


def same_run(earlier, checkpoint, run_dir):
    return os.path.realpath(earlier) == os.path.realpath(checkpoint) or \
        (runfolder.resumes_in(run_dir, earlier) and runfolder.resumes_in(run_dir, checkpoint))


def reported_checkpoint(report_dir):
    try:
        with open(os.path.join(report_dir, RECORD), encoding='utf-8') as handle:
            checkpoint = json.load(handle).get('checkpoint')
    except (OSError, ValueError, AttributeError):
        return None
    return checkpoint if isinstance(checkpoint, str) and checkpoint else None


# ----------------------------------------------------------------------------- the numbers behind the pictures

def attribute_rows(evaluation_set, attr):
    """Retrieval: (query entry indices, candidate entry indices) of attribute `attr`."""
    return (np.flatnonzero(evaluation_set.queries.entries[:, 1] == attr),
            np.flatnonzero(evaluation_set.candidates.entries[:, 1] == attr))


def query_aps(evaluation_set, embeddings, attr):
    """AP of each query of `attr` over its ranked candidates (evaluation.average_precisions, the --test
    metric): (query entry indices, APs float64 numpy)."""
    query_emb, cand_emb = embeddings
    q, c = attribute_rows(evaluation_set, attr)
    aps = evaluation.average_precisions(cand_emb[torch.from_numpy(c).to(cand_emb.device)],
                                   query_emb[torch.from_numpy(q).to(query_emb.device)],
                                   torch.from_numpy(evaluation_set.candidates.entries[c, 2]),
                                   torch.from_numpy(evaluation_set.queries.entries[q, 2]))
    return q, aps.numpy()


def value_aps(evaluation_set, q, aps):
    """[(value, number of queries, mean AP)] of an attribute's values with queries, by value: their
    query-weighted mean is the attribute's mAP (the metric averages over queries)."""
    values = evaluation_set.queries.entries[q, 2]
    return [(int(v), int((values == v).sum()), float(aps[values == v].mean())) for v in np.unique(values)]


def example_queries(aps, n):
    """Positions (in `aps`) of up to n queries: the best, the median and the worst by AP, distinct."""
    order = np.argsort(-aps, kind='stable')
    picks = [order[0], order[len(order) // 2], order[-1]] if len(order) else []
    return list(dict.fromkeys(int(p) for p in picks))[:n]


def retrieval_examples(evaluation_set, embeddings, attr, q, aps, k=RETRIEVAL_TOPK, n=3):
    """A few queries of `attr` with their top-k candidates of the ranking --test scores (dot
    products of the test embeddings, highest first): [{query, value, ap, results: [(candidate
    entry index, score, value, right)]}]."""
    query_emb, cand_emb = embeddings
    _, c = attribute_rows(evaluation_set, attr)
    cand = cand_emb[torch.from_numpy(c).to(cand_emb.device)].float().cpu()
    cand_values = evaluation_set.candidates.entries[c, 2]
    examples = []
    for pos in example_queries(aps, n):
        index = int(q[pos])
        value = int(evaluation_set.queries.entries[index, 2])
        scores = cand @ query_emb[index].float().cpu()
        top = torch.argsort(scores, descending=True, stable=True)[:k].numpy()
        examples.append(dict(query=index, value=value, ap=float(aps[pos]), results=[
            (int(c[j]), float(scores[j]), int(cand_values[j]), bool(cand_values[j] == value)) for j in top]))
    return examples


def tsne_input(evaluation_set, embeddings, attr, limit=TSNE_POINTS, seed=1):
    """The test embeddings of attribute `attr` that its t-SNE map places, at most `limit` of them
    (a seeded sample): (points (n, D) float32 numpy, values (n,) or None on Zappos50k, and where
    each row came from: (dataset position, entry index) pairs)."""
    rows, points, values = [], [], []
    for position, (dataset, emb) in enumerate(zip(evaluation_set.datasets, embeddings)):
        picked = np.flatnonzero(dataset.entries[:, 1] == attr)
        rows += [(position, int(i)) for i in picked]
        points.append(emb[torch.from_numpy(picked).to(emb.device)].float().cpu().numpy())
        if dataset.entries.shape[1] > 2:
            values.append(dataset.entries[picked, 2])
    points = np.concatenate(points) if points else np.zeros((0, 0), np.float32)
    values = np.concatenate(values) if values and len(values) == len(evaluation_set.datasets) else None
    if len(rows) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
        points, rows = points[keep], [rows[i] for i in keep]
        values = values[keep] if values is not None else None
    return points, values, rows


def tsne_map(points, seed):
    """2-D t-SNE (scikit-learn, seeded) of `points`; perplexity below the number of points."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits     # a dependency of scikit-learn
    perplexity = min(30.0, max(1.0, (len(points) - 1) / 3))
    # One thread: on a busy machine the OpenMP threads of the Barnes-Hut gradient wait on each other
    # (100 points: 12 s on 2 busy cores, 1 s on one thread; docs/report.md).
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(points)


# ----------------------------------------------------------------------------- metrics.jsonl

def read_metrics(path):
    """The epoch records of metrics.jsonl, the last one of each epoch, in epoch order."""
    by_epoch = {}
    with open(path, encoding='utf-8', errors='replace') as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise UserError(f"{path}:{number}: not a JSON line ({err}); the report cannot draw its curves") from err
            if isinstance(record, dict) and isinstance(record.get('epoch'), int):
                by_epoch[record['epoch']] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def loss_keys(records):
    """The loss terms recorded: every numeric key naming a loss (train_loss and any later terms)."""
    keys = dict.fromkeys(k for r in records for k, v in r.items()
                         if 'loss' in k and isinstance(v, (int, float)) and not isinstance(v, bool))
    return list(keys)


# ----------------------------------------------------------------------------- pictures

def _pyplot():
    import matplotlib
    matplotlib.use('Agg')                        # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def draw_curves(records, per_key, total_key, path):
    """Loss (total and terms), triplet accuracy, validation MeanAP with per-attribute mAP, and the
    learning rate, against epochs: one PNG of four panels."""
    plt = _pyplot()
    epochs = [r['epoch'] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), dpi=80)
    for key in loss_keys(records):
        axes[0, 0].plot(*_series(records, key), marker='.', label=key)
    axes[0, 0].set_title('training loss')
    axes[0, 1].plot(*_series(records, 'train_acc'), marker='.')
    axes[0, 1].set_title('training triplet accuracy (%)')
    axes[1, 0].plot(*_series(records, total_key), marker='.', linewidth=2.5, color='black', label=total_key)
    names = list(dict.fromkeys(n for r in records for n in (r.get(per_key) or {})))
    for name in names:
        xs = [r['epoch'] for r in records if name in (r.get(per_key) or {})]
        axes[1, 0].plot(xs, [r[per_key][name] for r in records if name in (r.get(per_key) or {})],
                        marker='.', linewidth=1, label=name)
    axes[1, 0].set_title(f'validation {total_key} and {per_key} (%)')
    axes[1, 1].plot(*_series(records, 'lr'), marker='.')
    axes[1, 1].set_title('learning rate (after the epoch)')
    for ax in axes.flat:
        ax.set_xlabel('epoch')
        if len(epochs) < 12:
            ax.set_xticks(epochs)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _series(records, key):
    rows = [r for r in records if isinstance(r.get(key), (int, float))]
    return [r['epoch'] for r in rows], [r[key] for r in rows]


def draw_tsne(xy, values, value_names, title, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.8), dpi=80)
    if values is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=10, color='tab:blue')
    else:
        cmap = plt.get_cmap('tab10' if len(np.unique(values)) <= 10 else 'tab20')
        for k, v in enumerate(np.unique(values)):
            mask = values == v
            ax.scatter(xy[mask, 0], xy[mask, 1], s=10, color=cmap(k % cmap.N), label=value_names(int(v)))
        ax.legend(fontsize=7, markerscale=1.5, loc='best')
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_retrieval(evaluation_set, examples, value_names, path):
    """Rows of query + top-k tiles; a green frame marks a candidate of the query's value (right), a
    red one another value (wrong)."""
    tiles, captions = [], []
    for ex in examples:
        tiles.append(_framed(load_image(evaluation_set.queries.image_path(ex['query'])), (40, 40, 40)))
        captions.append(f"AP {ex['ap']:.2f}: {value_names(ex['value'])}")
        for rank, (index, score, value, right) in enumerate(ex['results'], 1):
            tiles.append(_framed(load_image(evaluation_set.candidates.image_path(index)),
                                 (30, 160, 60) if right else (210, 40, 40)))
            captions.append(f"{rank} {'right' if right else 'wrong'} {score:.2f}")
        for _ in range(RETRIEVAL_TOPK - len(ex['results'])):
            tiles.append(Image.new('RGB', (TILE, TILE), (255, 255, 255)))
            captions.append('')
    visualize.image_grid(tiles, captions, RETRIEVAL_TOPK + 1, TILE).save(path)
    return path


def _framed(image, colour, width=5):
    return ImageOps.expand(ImageOps.pad(image.convert('RGB'), (TILE - 2 * width, TILE - 2 * width),
                                        color=(235, 235, 235)), border=width, fill=colour)


# ----------------------------------------------------------------------------- the report

class Writer:
    """Writes the report of `plan` (see prepare) from what commands.test computed."""

    def __init__(self, plan, source, args):
        self.plan, self.source, self.args = plan, source, args

    def write(self, net, split_files, evaluation_set, embeddings, result, device, logger):
        start = time.time()
        tmp = tempfile.mkdtemp(prefix='.tmp-report-', dir=self.plan.run_dir)
        try:
            os.makedirs(os.path.join(tmp, 'img'))
            record = self.build(tmp, net, split_files, evaluation_set, embeddings, result, device)
            utils.write_json(record, os.path.join(tmp, RECORD))
            self.swap_in(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        index = os.path.join(self.plan.report_dir, 'index.html')
        logger.info(f'report: {index} ({time.time() - start:.1f} s)')
        print(f'report: {index}')
        return index

    def swap_in(self, tmp):
        """The new report replaces the old one whole: renames in the run folder, the old one removed
        (or, --overwrite over another run's report, moved aside) only once the new one is there."""
        final = self.plan.report_dir
        old = None
        if os.path.isdir(final):
            earlier = reported_checkpoint(final)
            if earlier and same_run(earlier, self.source.checkpoint, self.plan.run_dir):
                old = tempfile.mkdtemp(prefix='.tmp-report-old-', dir=self.plan.run_dir)
                os.rename(final, os.path.join(old, REPORT_DIR))
            else:
                aside = runfolder.aside_name(final)
                os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except OSError as err:
            raise UserError(f"cannot write the report {final}: {err.strerror or err}") from err
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def build(self, out, net, split_files, evaluation_set, embeddings, result, device):
        args = self.args
        retrieval = isinstance(evaluation_set, evaluation.RetrievalEvaluation)
        names = value_namer(split_files)
        attributes = list(split_files.attributes)
        steps = 1 + 3 * len(attributes)
        progress = tqdm(total=steps, desc='report', disable=not sys.stderr.isatty(), leave=False)
        sections = [self.run_section(result), self.results_section(result, evaluation_set)]
        record = dict(checkpoint=self.source.checkpoint, model=args.model, dataset=args.dataset,
                      epoch=self.source.epoch, result=result, attributes={})
        sections.append(self.curves_section(out, evaluation_set))
        progress.update()
        attention = spatial_attention(net)
        blocks = []
        for attr, name in enumerate(attributes):
            entry = record['attributes'][name] = {}
            parts = [self.attention_part(out, net, attention, evaluation_set, attributes, attr, device)]
            progress.update()
            if retrieval:
                q, aps = query_aps(evaluation_set, embeddings, attr)
                examples = retrieval_examples(evaluation_set, embeddings, attr, q, aps)
                per_value = value_aps(evaluation_set, q, aps)
                entry.update(mAP=float(aps.mean()) * 100 if len(aps) else 0.0, queries=len(aps),
                             per_value=[dict(value=v, name=names(attr)(v), queries=n, AP=100 * ap)
                                        for v, n, ap in per_value],
                             examples=examples)
                parts.append(self.retrieval_part(out, evaluation_set, examples, names(attr), attr))
            else:
                parts.append(f'<h4>Retrieval examples</h4><p class="note">{ZAPPOS_NO_RETRIEVAL}</p>')
            progress.update()
            points, values, rows = tsne_input(evaluation_set, embeddings, attr, seed=args.seed)
            entry['tsne_points'] = len(rows)
            parts.append(self.tsne_part(out, points, values, names(attr), name, attr))
            progress.update()
            if retrieval:
                parts.append(value_table(entry['per_value'], entry['mAP']))
            else:
                parts.append('<h4>AP of each value</h4><p class="note">Zappos50k is scored by triplet accuracy '
                             'per condition (CSN\'s lists name no attribute values): there is no AP per value.</p>')
            score = result[evaluation_set.per_key].get(name)
            blocks.append(f'<section class="attribute" id="attr-{attr}"><h3>{_e(name)}'
                          f'{f" — {evaluation_set.per_key} {score:.2f}" if score is not None else ""}</h3>'
                          + ''.join(parts) + '</section>')
        progress.close()
        sections.append('<section id="attributes"><h2>4–7. Per attribute: attention, retrieval, t-SNE map, '
                        'AP per value</h2>' + ''.join(blocks) + '</section>')
        with open(os.path.join(out, 'index.html'), 'w', encoding='utf-8') as handle:
            handle.write(page(f'{args.model} on {args.dataset}: report', sections))
        return record

    # -- sections 1 to 3

    def run_section(self, result):
        args, src = self.args, self.source
        rows = [('model', args.model), ('dataset', args.dataset), ('checkpoint', src.checkpoint),
                ('epoch', src.epoch), ('validation score saved in it (%)', _percent(src.validation)),
                ('written by', "the authors' code" if src.original else 'asen.py')]
        settings = {k: v for k, v in sorted(args.as_dict().items()) if k not in NOT_TRAINING}
        command = (f'<pre>{_e(src.command)}</pre>' if src.command else
                   '<p class="note">An authors\' checkpoint: it was trained by their code, so there is no asen.py '
                   'command line that made it; the settings below are those it was tested with.</p>')
        return ('<section id="run"><h2>1. The run</h2>' + kv_table(rows)
                + '<h3>The command line that trains it again</h3>' + command
                + '<details><summary>All settings</summary>' + kv_table(settings.items()) + '</details></section>')

    def results_section(self, result, evaluation_set):
        per, total = evaluation_set.per_key, evaluation_set.total_key
        names = list(result[per])
        head = ''.join(f'<th>{_e(n)}</th>' for n in names + [total])
        body = [('ours (test split)', [result[per][n] for n in names] + [result[total]])]
        random_key = f'Random {total}'
        if random_key in result:
            body.append(('Random (random embeddings)', [None] * len(names) + [result[random_key]]))
        figure = paper_figure(self.args)
        notes = []
        if figure is not None:
            label, source, values = figure
            body.append((f'paper: {label}', [values.get(n) for n in names + [total]]))
            notes.append(f'Paper figure of {_e(label)}: {_e(source)}.')
        else:
            notes.append(f'reproduce.py knows no paper figure for {_e(self.args.model)} on {_e(self.args.dataset)}.')
        rows = ''.join(f'<tr><th>{_e(label)}</th>' + ''.join(f'<td>{_num(v)}</td>' for v in values) + '</tr>'
                       for label, values in body)
        what = 'triplet accuracy per condition (%)' if per == 'accuracy' else 'mAP per attribute (%)'
        return (f'<section id="results"><h2>2. Results: {what}</h2><table><tr><th></th>{head}</tr>{rows}</table>'
                + ''.join(f'<p class="note">{n}</p>' for n in notes) + '</section>')

    def curves_section(self, out, evaluation_set):
        if not self.plan.metrics:
            return ('<section id="curves"><h2>3. Training curves</h2><p class="note">An authors\' checkpoint: no '
                    'metrics.jsonl records its training, so there are no curves.</p></section>')
        records = read_metrics(self.plan.metrics)
        if not records:
            return (f'<section id="curves"><h2>3. Training curves</h2><p class="note">{_e(self.plan.metrics)} '
                    'records no epoch yet.</p></section>')
        draw_curves(records, evaluation_set.per_key, evaluation_set.total_key, os.path.join(out, 'img', 'curves.png'))
        return ('<section id="curves"><h2>3. Training curves</h2>'
                f'<p>From metrics.jsonl, {len(records)} epoch(s).</p>'
                '<img src="img/curves.png" alt="training curves: loss, accuracy, validation scores, learning rate">'
                '</section>')

    # -- per attribute

    def attention_part(self, out, net, attention, evaluation_set, attributes, attr, device):
        if attention is None:
            return (f'<h4>Attention</h4><p class="note">{_e(self.args.model)} has no spatial attention: '
                    'there is no map of where it looks.</p>')
        samples = analysis.samples_per_attribute(evaluation_set.images, len(attributes), ATTENTION_IMAGES)
        samples = [(path, a) for path, a, _ in samples if a == attr]
        if not samples:
            return '<h4>Attention</h4><p class="note">No test image of this attribute.</p>'
        name = f'attention_{attr}.png'
        visualize.save_attention_grid(net, samples, attributes, evaluation_set.images.transform, device,
                                      os.path.join(out, 'img', name), columns=ATTENTION_IMAGES)
        return (f'<h4>Attention</h4><p>Where the network looks for {_e(attributes[attr])} in {len(samples)} '
                f'test image(s): red is high.</p><img src="img/{name}" alt="attention of {_e(attributes[attr])}">')

    def retrieval_part(self, out, evaluation_set, examples, value_name, attr):
        if not examples:
            return '<h4>Retrieval examples</h4><p class="note">No test query of this attribute.</p>'
        name = f'retrieval_{attr}.png'
        draw_retrieval(evaluation_set, examples, value_name, os.path.join(out, 'img', name))
        lines = ''.join(f'<li>query of value {_e(value_name(ex["value"]))}: AP {ex["ap"]:.3f}; top {len(ex["results"])}: '
                        + ', '.join('right' if r[3] else 'wrong' for r in ex['results']) + '</li>' for ex in examples)
        return ('<h4>Retrieval examples</h4><p>The best, median and worst query by AP, each with its top '
                f'{RETRIEVAL_TOPK} test candidates (green frame: the query\'s value, right; red: wrong).</p>'
                f'<img src="img/{name}" alt="retrieval examples"><ul>{lines}</ul>')

    def tsne_part(self, out, points, values, value_name, attr_name, attr):
        if len(points) < TSNE_MIN_POINTS:
            return (f'<h4>t-SNE map</h4><p class="note">{len(points)} test embedding(s) of this attribute: too few '
                    f'for a map (at least {TSNE_MIN_POINTS}).</p>')
        xy = tsne_map(points, self.args.seed)
        name = f'tsne_{attr}.png'
        draw_tsne(xy, values, value_name, f'{attr_name}: {len(points)} test embeddings', os.path.join(out, 'img', name))
        colour = 'coloured by value' if values is not None else \
            'uncoloured: Zappos50k\'s triplet lists name no attribute values'
        return (f'<h4>t-SNE map</h4><p>{len(points)} test embeddings of this attribute (at most {TSNE_POINTS}, a '
                f'seeded sample), {colour}.</p><img src="img/{name}" alt="t-SNE map of {_e(attr_name)}">')


ZAPPOS_NO_RETRIEVAL = ('Zappos50k is scored by triplet accuracy on CSN\'s test triplets: it has no queries '
                       'and candidates with attribute values, so there is nothing to rank and no retrieval grid.')


def value_namer(split_files):
    """attr -> (value -> its name from meta.json's VALUES, else 'value k')."""
    values = {}
    try:
        with open(split_files.meta_path, encoding='utf-8') as handle:
            values = json.load(handle)[split_files.dataset].get('VALUES') or {}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        values = {}

    def for_attribute(attr):
        name = split_files.attributes[attr]
        listed = values.get(name) if isinstance(values, dict) else None
        return lambda v: str(listed[v]) if isinstance(listed, list) and 0 <= v < len(listed) else f'value {v}'
    return for_attribute


def paper_figure(args):
    """(row label, source, {column: figure}) of reproduce.py's paper figures for this model on this
    dataset, or None."""
    try:
        import reproduce
    except ImportError:
        return None
    for name, table in reproduce.TABLES.items():
        if table['dataset'] != args.dataset:
            continue
        for row in table['rows']:
            flags = dict(zip(row['flags'][::2], row['flags'][1::2]))
            stage_ok = '--stage' not in flags or str(args.stage or 1) == flags['--stage']
            if flags.get('--model') == args.model and stage_ok and row['label'] in reproduce.FIGURES.get(name, {}):
                source, values = reproduce.FIGURES[name][row['label']]
                return row['label'], source, values
    return None


# ----------------------------------------------------------------------------- HTML

STYLE = """body{font-family:sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
td{font-variant-numeric:tabular-nums}.note{color:#555;font-style:italic}
section.attribute{border-top:2px solid #888;margin-top:1.5em}img{max-width:100%}
.bar{display:inline-block;height:.8em;background:#4a7}.low .bar{background:#c44}.low{color:#a00}
pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}"""


def page(title, sections):
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>\n' + '\n'.join(sections) + '\n</body></html>\n')


def kv_table(rows):
    return '<table>' + ''.join(f'<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>' for k, v in rows) + '</table>'


def value_table(per_value, mean_ap):
    """The AP of each value, lowest first; values below the attribute's mAP in red."""
    rows = []
    for item in sorted(per_value, key=lambda d: d['AP']):
        low = ' class="low"' if item['AP'] < mean_ap else ''
        rows.append(f'<tr{low}><td>{_e(item["name"])}</td><td>{item["queries"]}</td><td>{item["AP"]:.2f}</td>'
                    f'<td><span class="bar" style="width:{max(item["AP"], 0.5) * 2:.0f}px"></span></td></tr>')
    return ('<h4>AP of each value</h4><p>Mean AP of the queries of each value, lowest first; red: below the '
            f'attribute\'s mAP ({mean_ap:.2f}), which is their query-weighted mean.</p>'
            '<table><tr><th>value</th><th>queries</th><th>AP (%)</th><th></th></tr>' + ''.join(rows) + '</table>')


def _e(value):
    return html.escape(str(value))


def _percent(fraction):
    return f'{100 * fraction:.2f}' if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else fraction


def _num(value):
    return '' if value is None else f'{value:.2f}'


# ----------------------------------------------------------------------------- reproduce.py's index

def write_index(folder, tables):
    """runs/reproduce/index.html: every collected table (reproduce.comparison's data), ours beside the
    paper's figure, each row linking to the reports of its runs. `tables`: [(data, {row label: [run
    folders]})]. Returns the path."""
    blocks = []
    for data, runs_by_row in tables:
        columns = data['columns']
        head = '<tr><th>row</th><th>figures</th><th>runs (reports)</th>' + ''.join(
            f'<th>{_e(c)}</th>' for c in columns) + '</tr>'
        rows = []
        for entry in data['rows']:
            links = ', '.join(_report_link(folder, run) for run in runs_by_row.get(entry['row'], []))
            rows.append(f'<tr><th>{_e(entry["row"])}</th><td>ours</td><td>{links or entry["runs"]}</td>'
                        + ''.join(f'<td>{_num(entry["ours"].get(c))}</td>' for c in columns) + '</tr>')
            if 'paper' in entry:
                rows.append(f'<tr><th>{_e(entry["row"])}</th><td>paper</td><td>{_e(entry["source"])}</td>'
                            + ''.join(f'<td>{_num(entry["paper"].get(c))}</td>' for c in columns) + '</tr>')
        blocks.append(f'<section id="{_e(data["table"])}"><h2>{_e(data["table"])}: {_e(data["dataset"])} '
                      f'({_e(data["score"])})</h2><table>{head}{"".join(rows)}</table>'
                      f'<p class="note">Compare with {_e(data["compare"])}.</p></section>')
    path = os.path.join(folder, 'index.html')
    with utils.atomic_file(path, 'index') as handle:
        handle.write(page('reproduce.py: the collected tables', blocks).encode('utf-8'))
    return path


def _report_link(folder, run):
    report = os.path.join(run, REPORT_DIR, 'index.html')
    name = os.path.basename(os.path.normpath(run))
    if not os.path.isfile(report):
        return f'{_e(name)} (no report: python asen.py --report --resume {_e(os.path.join(run, "model_best.pth.tar"))})'
    return f'<a href="{_e(os.path.relpath(report, folder))}">{_e(name)}</a>'
