"""What the engine reads, assembled from the configuration: the dataset's files, the training
triplets, the evaluation sets, their loaders and image caches."""

import logging
import os

import numpy as np
import torch

import datasets
import synthfashion
from lib import asenpp, datacheck, evaluation, gpuinput, imagecache, runtime, zappos
from lib.config import TRIPLET_DATASETS
from lib.runtime import local_first
from utils import UserError


def prepare_dataset(args):
    """The dataset's split files (SynthFashion generated on first use, by training only); Zappos50k's
    triplet lists."""
    if os.path.exists(args.data_path) and not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path} is a file, not a folder; pass the folder holding the datasets")
    if args.dataset == 'Zappos50k':
        return zappos.ZapposFiles(args.data_path)
    if args.dataset == 'SynthFashion':
        n_eval = max(args.synth_images // 4, 8)
        if not generates_data(args):
            check_synth_generated(args, n_eval)
            return datasets.SplitFiles(args.data_path, args.dataset)
        try:
            synthfashion.ensure(os.path.join(args.data_path, 'SynthFashion'), n_train=args.synth_images,
                                n_valid=n_eval, n_test=n_eval)
        except synthfashion.NotOurFolder as err:
            raise UserError(f"{err} (or pass another --data_path)") from err
    split_files = datasets.SplitFiles(args.data_path, args.dataset)
    if getattr(args, 'skip_bad_images', False) and runtime.is_main_process():
        # what --skip-bad-images will leave out, said before a long run starts (docs/datasets.md)
        datacheck.log_before_training(split_files, args, logging.getLogger('asen').info)
    return split_files


def check_data_folder(args):
    """Before the run folder is made: the dataset's folder is there (or will be generated), so a
    mistyped --data_path or --dataset leaves no empty runs/<name>/ behind."""
    if os.path.exists(args.data_path) and not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path} is a file, not a folder; pass the folder holding the datasets")
    if args.dataset == 'SynthFashion' and generates_data(args):
        return                                    # training generates it on first use
    if args.dataset == 'SynthFashion':
        missing_synth_folder(args)
    elif args.dataset == 'Zappos50k':
        zappos.ZapposFiles(args.data_path)         # its folders, named as its own layout wants
    else:
        datasets.check_dataset_folder(args.data_path, args.dataset)


def missing_synth_folder(args):
    """One line when a command that never generates SynthFashion finds no folder at all: the
    --data_path (often a checkpoint's, or relative to another working directory) is wrong."""
    root = os.path.join(args.data_path, 'SynthFashion')
    if os.path.isdir(root):
        return
    origin = '' if 'data_path' in getattr(args, 'explicit', ()) or not getattr(args, 'resume', None) else \
        f' (--data_path {args.data_path} as saved in --resume {args.resume})'
    where = '' if os.path.isabs(root) else f', relative to the working directory {os.getcwd()}'
    raise UserError(f"dataset folder {root} not found{origin}{where}; pass --data_path the folder that "
                    f"holds the SynthFashion the model was trained on (testing never (re)generates data)")


def generates_data(args):
    """Only training (asen.py, pretrain.py) may generate or regenerate SynthFashion: --test,
    --visualize and --retrieve read the data a model was trained on, or stop."""
    return not (getattr(args, 'test', False) or getattr(args, 'report', False) or getattr(args, 'visualize', False)
                or getattr(args, 'retrieve', None))


def check_synth_generated(args, n_eval):
    """SynthFashion as --synth-images asks, already there; else one line (nothing is generated)."""
    missing_synth_folder(args)
    root = os.path.join(args.data_path, 'SynthFashion')
    if synthfashion.is_generated(root, n_train=args.synth_images, n_valid=n_eval, n_test=n_eval):
        return
    saved = synthfashion.saved_settings(root)
    if saved is None:
        state = f"{root} does not hold a generated SynthFashion (no valid settings.json)"
    else:
        state = f"{root} was generated with other settings ({root}/settings.json: n_train {saved.get('n_train')})"
    raise UserError(f"{state}, not those of --synth-images {args.synth_images}; testing never (re)generates "
                    f"data: pass the --synth-images it was generated with, or train once to generate it")


def training_set(split_files, args):
    """The training triplets of the dataset: attribute labels or, on Zappos50k, the CSN lists."""
    if args.model == 'ASENpp':
        return asenpp.training_set(split_files, args)
    transform = datasets.build_transform(args.img_size, train=True)
    if args.dataset in TRIPLET_DATASETS:
        return zappos.ZapposTripletDataset(split_files, args.num_triplets, transform, args.seed, args.skip_bad_images)
    return datasets.TripletDataset(split_files, args.num_triplets, transform, args.seed, args.skip_bad_images)


def evaluation_of(split_files, split, args, logger):
    """The evaluation of `split`: retrieval mAP, or on Zappos50k triplet accuracy."""
    transform = datasets.build_transform(args.img_size, train=False)
    if args.dataset in TRIPLET_DATASETS:
        split = {'valid': 'val'}.get(split, split)          # CSN names its lists train, val, test
        eval_set = zappos.TripletEvalSet(split_files, split, transform, args.skip_bad_images)
        report_skipped(logger, f'{split} triplets', eval_set.skipped)
        return evaluation.TripletEvaluation(eval_set, split_files.attributes)
    dataset_class = asenpp.OriginalsRetrievalDataset if asenpp.uses_originals(args) else datasets.RetrievalDataset
    queries = dataset_class(split_files, split, 'query', transform, args.skip_bad_images)
    candidates = dataset_class(split_files, split, 'candidate', transform, args.skip_bad_images)
    report_skipped(logger, f'{split} split', queries.skipped + candidates.skipped)
    report_dropped(logger, split, queries, candidates)
    if args.cache_images:
        attach_image_cache([queries, candidates], split_files, split, args, logger)
    return evaluation.RetrievalEvaluation(queries, candidates, split_files.attributes)


def report_skipped(logger, what, count):
    if count:
        logger.info(f'--skip-bad-images: left out {count} missing or unreadable image(s) of the {what}')


def report_dropped(logger, split, queries, candidates):
    """The queries and candidates --skip-bad-images left out, counted (their scores cover the rest:
    evaluation.percent records the share in test_results.json)."""
    listed = [getattr(d, 'listed', len(d)) for d in (queries, candidates)]
    if listed != [len(queries), len(candidates)]:
        logger.info(f'--skip-bad-images: the {split} split is scored on {len(queries)} of {listed[0]} queries '
                    f'and {len(candidates)} of {listed[1]} candidates')


def default_workers(workers, device):
    """--workers, else 4 on CUDA and 0 on the CPU, as the original."""
    return workers if workers is not None else (4 if device.type == 'cuda' else 0)


def make_loader(dataset, batch_size, device, workers, channels_last, persistent=False):
    """Batches of `batch_size` in dataset order, on `device` and ready for the network
    (gpuinput.DeviceLoader: uint8 from the workers, flip and normalisation on the device, the same
    floats and flips as the original's transform). `persistent` keeps the workers across passes;
    each pass still gets the triplets that `set_epoch` drew, since the loader hands them to the
    workers batch by batch."""
    workers = default_workers(workers, device)
    if getattr(getattr(dataset, 'dataset', dataset), 'originals', False):
        # ASENpp stage 2: the decoded originals (of many sizes) travel beside the views, through
        # the item path and the dataset's collate_fn; engine.batch_to_device moves them
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                           pin_memory=device.type == 'cuda', collate_fn=dataset.collate_fn,
                                           worker_init_fn=gpuinput.ignore_stop_signals)
    return gpuinput.DeviceLoader(dataset, batch_size, device, workers, channels_last, persistent)


class LoaderFrom:
    """A plain DataLoader's pass from batch `first_batch` on (a resumed epoch of ASEN++ stage 2's
    item loader): the items of the batches left, in one DataLoader that draws its pass's base seed
    as the whole one does. Its length and dataset are the whole loader's, for the log lines."""

    def __init__(self, loader, first_batch):
        self.loader, self.dataset = loader, loader.dataset
        rest = torch.utils.data.Subset(loader.dataset, range(first_batch * loader.batch_size, len(loader.dataset)))
        self.rest = torch.utils.data.DataLoader(rest, batch_size=loader.batch_size, num_workers=loader.num_workers,
                                                pin_memory=loader.pin_memory, collate_fn=loader.collate_fn,
                                                worker_init_fn=loader.worker_init_fn)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.rest)


def cache_workers(args):
    """Decoding processes for building the image cache: --workers, else up to 4."""
    return args.workers if args.workers is not None else min(4, os.cpu_count() or 1)


def attach_image_cache(dataset_list, split_files, split, args, logger):
    """Serve `dataset_list` (all of one split) from the split's image cache, built if stale."""
    ids = np.concatenate([d.image_ids for d in dataset_list])
    cache = local_first(lambda: imagecache.ensure(split_files, split, ids, args.img_size, cache_workers(args),
                                                  args.skip_bad_images, may_build=runtime.first_on_node(),
                                                  log=logger.info))
    for dataset in dataset_list:
        dataset.attach_cache(cache)


def synth_regions(split_files, split):
    """SynthFashion's attribute regions of `split` (n_images, n_attributes, boxes, 4), else None."""
    path = split_files.path(f'regions_{split}.txt')
    if not os.path.isfile(path):
        return None
    n_images = len(split_files.filenames(split))
    try:
        regions = synthfashion.read_regions(path, len(split_files.attributes))
    except ValueError as err:
        raise UserError(f"{path}: not a regions file ({' '.join(str(err).split())[:120]}); regenerate the "
                        f"dataset (delete {split_files.root})") from err
    if len(regions) != n_images:
        raise UserError(f"{path}: {len(regions)} lines for {n_images} images in filenames_{split}.txt; "
                        f"regenerate the dataset (delete {split_files.root})")
    return regions
