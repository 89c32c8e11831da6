"""Train and test ASEN (Ma et al., AAAI 2020): the entry point.

    python asen.py --dataset FashionAI                                   # train
    python asen.py --test --resume runs/ASEN/model_best.pth.tar          # test
    python asen.py --dataset SynthFashion                                # offline CPU demo

This file holds the flags, the resolution of the configuration and the dispatch to the commands
(lib/commands.py); the loops are lib/engine.py, the networks model.py, the loss losses.py.
"""
import argparse
import os
import sys
from typing import NamedTuple

import losses
import model
import utils
from lib import asenpp, checkpoints, commands, config, inputs, runfolder, runtime, tables
from lib import datacheck, images, report
from lib.config import COMPILE_MODES, DATASETS
from lib.runtime import is_main_process, local_first


def get_args_parser():
    parser = utils.OneLineArgumentParser(
        command='asen.py',
        description='Attribute-Specific Embedding Network (ASEN): train, or test with --test --resume.',
        formatter_class=utils.HelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--dataset', default='FashionAI', choices=DATASETS,
                      help='dataset under --data_path; SynthFashion is generated on first use and '
                           f'brings a CPU preset for the flags not given: {config.describe_preset()}')
    data.add_argument('--data_path', '--data-path', default='data', help='folder holding the datasets')
    data.add_argument('--img_size', '--img-size', type=int, default=224,
                      help='Resize and CenterCrop size; the attention map size follows from it')
    data.add_argument('--num_triplets', '--num-triplets', type=int, default=100000,
                      help='training triplets drawn anew each epoch')
    data.add_argument('--synth-images', '--synth_images', dest='synth_images', type=int, default=2000,
                      help='SynthFashion: training images to generate (valid and test get a quarter each)')
    data.add_argument('--skip-bad-images', dest='skip_bad_images', action='store_true',
                      help='skip listed images that are missing or unreadable, and say how many (without '
                           'it: stop and name the first one)')
    data.add_argument('--check-data', '--check_data', dest='check_data', action='store_true',
                      help="count the images the split files name that are missing or cannot be read, per "
                           "split and per attribute, in --workers processes (default: one a core, up to 8), "
                           "print the report and exit (writes nothing); with --skip-bad-images a training "
                           "run logs the same report before it starts. See docs/datasets.md")
    data.add_argument('--workers', type=int, default=None,
                      help='DataLoader worker processes; they decode and resize, the device normalises, and '
                           'the training ones persist across epochs (default: 4 on CUDA, 0 on CPU, as the original)')
    data.add_argument('--allow-large-images', dest='allow_large_images', action='store_true',
                      help="decode images of more than PIL's Image.MAX_IMAGE_PIXELS (89,478,485 pixels, about "
                           "89 megapixels; without it they are refused by name: PIL itself only warns there and "
                           "refuses from twice that); only for images you trust")
    data.add_argument('--cache-images', '--cache_images', dest='cache_images', action='store_true',
                      help='decode and resize each split\'s images once into a uint8 memory-mapped file '
                           'data/<Dataset>/cache/<split>_<img-size>.u8 (N x S x S x 3 bytes), rebuilt '
                           'when the images, their list or --img-size change')

    net = parser.add_argument_group('model')
    net.add_argument('--model', default='ASENet', choices=list(model.MODELS),
                     help='network: ASENet and its ablations (_noASA, _noACA); ASENet_V2, the authors\' later '
                          'variant (embedding size = trunk channels, e.g. 1024 for resnet50: --dim_embed is '
                          'ignored); ASENet_V2_fc, V2 with a final Linear to --dim_embed (their earlier V2 code); '
                          'ConditionalSimNet (CSN, Veit et al. 2017); TripletNet, one embedding for all attributes; '
                          'ASENpp, ASEN++ (TIP 2021): global and local branches, trained in two --stage runs')
    net.add_argument('--backbone', default='resnet50', choices=model.BACKBONES,
                     help='ResNet trunk, cut after layer3')
    net.add_argument('--pretrained', dest='pretrained', action='store_true', default=True,
                     help='start the trunk from ImageNet weights (default, except in the SynthFashion preset)')
    net.add_argument('--no-pretrained', dest='pretrained', action='store_false',
                     help='random init instead of ImageNet weights')
    net.add_argument('--backbone-weights', dest='backbone_weights', default=None, metavar='FILE',
                     help='trunk weights from a local file instead of the ImageNet download: a torchvision '
                          'ResNet state dict (e.g. resnet50-0676ba61.pth) or one written by pretrain.py')
    net.add_argument('--dim_embed', '--dim-embed', type=int, default=1024, help='embedding size')
    net.add_argument('--csn-fixed-masks', dest='csn_fixed_masks', action='store_true',
                     help='ConditionalSimNet: fixed disjoint 0/1 masks, not trained (without it: learned '
                          'masks initialised N(0.9, 0.7))')
    net.add_argument('--csn-reg', dest='csn_reg', action='store_true',
                     help='ConditionalSimNet: add the CSN regularisers to the loss, --csn-embed-weight x '
                          'embedding L2 norm + --csn-mask-weight x mask L1 norm (without it: none, as the ASEN '
                          'authors\' CSN baseline)')
    net.add_argument('--csn-embed-weight', dest='csn_embed_weight', type=float, default=losses.CSN_EMBED_WEIGHT,
                     help='ConditionalSimNet with --csn-reg: weight of the embedding L2 norm (default: the CSN '
                          'authors\' %(default)s)')
    net.add_argument('--csn-mask-weight', dest='csn_mask_weight', type=float, default=losses.CSN_MASK_WEIGHT,
                     help='ConditionalSimNet with --csn-reg: weight of the mask L1 norm (default: the CSN '
                          'authors\' %(default)s)')
    net.add_argument('--stage', type=int, choices=(1, 2), default=None,
                     help='ASENpp: 1 trains the global branch alone (and brings --epochs 50 --step_size 3 '
                          '--decay_rate 0.9); 2 starts from a stage-1 --resume and trains both branches '
                          '(and brings --epochs 20 --step_size 1 --decay_rate 0.9); flags given win '
                          '(default: 1, or the checkpoint\'s stage)')
    net.add_argument('--local-backbone', '--local_backbone', dest='local_backbone', default='resnet34',
                     choices=model.BACKBONES, help='ASENpp: the local branch\'s ResNet trunk, cut after layer3')
    net.add_argument('--local-size', '--local_size', dest='local_size', type=int, default=None,
                     help='ASENpp: side of the local branch\'s input crop (default: half of --img-size, '
                          '112 at 224)')
    net.add_argument('--threshold', type=float, default=0.1,
                     help='ASENpp: the local crop keeps the box of the attention above this fraction of '
                          'its min-max range, in (0, 1)')
    net.add_argument('--beta', type=float, default=0.6,
                     help='ASENpp stage 2: weight of the global branch in the test embedding '
                          '[sqrt(beta) global; sqrt(1 - beta) local]')
    net.add_argument('--local-crop', '--local_crop', dest='local_crop', choices=('original', 'view'),
                     default='original',
                     help='ASENpp stage 2: crop the local input from the original image (the authors\') '
                          'or from the --img-size view (a shortcut that loses detail; works with '
                          '--cache-images)')

    train = parser.add_argument_group('training')
    train.add_argument('--epochs', type=int, default=200, help='last epoch to train')
    train.add_argument('--start_epoch', '--start-epoch', type=int, default=1,
                       help='first epoch (set from the checkpoint with --resume)')
    train.add_argument('--batch-size', '--batch_size', dest='batch_size', type=int, default=16,
                       help='triplets per batch, per process: under torchrun with N processes a '
                            'step sees N x this many triplets')
    train.add_argument('--eval-batch-size', '--eval_batch_size', dest='eval_batch_size', type=int, default=64,
                       help='images per batch when embedding the evaluation splits (no gradients, so larger '
                            'than training\'s; the embeddings do not depend on it beyond float rounding)')
    train.add_argument('--lr', type=float, default=1e-4, help='Adam learning rate')
    train.add_argument('--step_size', '--step-size', type=int, default=1, help='StepLR step, in epochs')
    train.add_argument('--decay_rate', '--decay-rate', type=float, default=0.985, help='StepLR gamma')
    train.add_argument('--margin', type=float, default=0.2, help='triplet ranking margin')
    train.add_argument('--lr-global', '--lr_global', dest='lr_global', type=float, default=1e-5,
                       help='ASENpp stage 2: learning rate of the global branch and the attribute '
                            'embedding (--lr is the local branch\'s)')
    train.add_argument('--local-weight', '--local_weight', dest='local_weight', type=float, default=0.1,
                       help='ASENpp stage 2: weight of the local branch\'s triplet loss')
    train.add_argument('--align-weight', '--align_weight', dest='align_weight', type=float, default=0.1,
                       help='ASENpp stage 2: weight of the global-local alignment loss')
    train.add_argument('--seed', type=int, default=1, help='seeds Python random, numpy and torch')

    perf = parser.add_argument_group('performance (off unless given or preset: the original semantics)')
    perf.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'),
                      help='autocast precision (default: off); fp16 uses a GradScaler. off is fp32, but on '
                           'Ampere and later GPUs PyTorch runs fp32 convolutions in TF32 unless --no-tf32 is '
                           'given (see --tf32): --amp off --no-tf32 is the authors\' full fp32')
    perf.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=None,
                      help='--tf32: fp32 convolutions and matmuls on CUDA in TF32 (10-bit mantissa, faster); '
                           '--no-tf32: both in full fp32; neither (default): PyTorch\'s own setting is left '
                           'as it is (TF32 convolutions, full fp32 matmuls); no effect on CPUs')
    perf.add_argument('--channels-last', dest='channels_last', action=argparse.BooleanOptionalAction,
                      default=False, help='channels_last memory format for the network and its inputs')
    perf.add_argument('--compile', action='store_true',
                      help='torch.compile the network in --compile-mode (whether it is faster depends on the GPU '
                           'and mode: benchmarks/gpu_check.sh measures it); a last partial batch runs eagerly '
                           '(no recompilation)')
    perf.add_argument('--compile-mode', '--compile_mode', dest='compile_mode', default='default',
                      choices=COMPILE_MODES,
                      help='torch.compile mode for --compile: reduce-overhead and max-autotune replay the '
                           'training step\'s forward and backward as CUDA graphs (static shapes; evaluation '
                           'is compiled without them)')
    perf.add_argument('--concat-forward', dest='concat_forward', action=argparse.BooleanOptionalAction,
                      default=False,
                      help='one forward pass over anchor+negative+positive (changes BatchNorm batch '
                           'statistics; the original does three passes)')
    perf.add_argument('--sync-bn', dest='sync_bn', action='store_true',
                      help='under torchrun on GPUs: SyncBatchNorm (batch statistics over all processes); '
                           'not available on CPUs (torch has no CPU kernel); no effect in one process')

    run = parser.add_argument_group('run')
    run.add_argument('--name', default='ASEN',
                     help='run folder runs/<name>/ for snapshots and logs (with --resume, the checkpoint\'s run; '
                          'for --test, --visualize or --retrieve of a file outside a run folder, the file\'s name)')
    run.add_argument('--resume', default=None, metavar='CHECKPOINT',
                     help='checkpoint to resume training from or to test; every flag not given is taken from '
                          'it, --name (so the run folder runs/<name>/ it writes to) and --data_path included, '
                          'except that --test, --visualize and --retrieve of a file outside a run folder write to '
                          'runs/<the file\'s name>/ (runs/<its folder>-model_best/ for a model_best.pth.tar). '
                          '"auto": continue from the newest complete snapshot in runs/<name>/ (step or epoch), '
                          'or start the run when there is none, or return at once (exit 0) when it has finished; a '
                          'snapshot of other settings is refused (docs/reliability.md: one run a folder). A '
                          'run stopped by SIGTERM, SIGUSR1 or Ctrl-C finishes its step, writes a step snapshot '
                          'and exits with status 75 (requeue); see docs/preemption.md')
    run.add_argument('--checkpoint-every', '--checkpoint_every', dest='checkpoint_every', default='5m',
                     type=config.checkpoint_interval, metavar='N|Nm',
                     help='also write a step snapshot runs/<name>/step.pth.tar every N training steps, or every '
                          'N minutes (Nm), from which a killed run continues exactly (--resume auto); 0: only the '
                          'epoch snapshots. The default, 5m, loses at most five minutes of training when the '
                          'machine goes away, and writing a snapshot (weights, Adam\'s moments, the RNGs) takes '
                          'a small fraction of that')
    run.add_argument('--overwrite', action='store_true',
                     help='let a new training run replace the snapshots and metrics.jsonl already in '
                          'runs/<name>/ (default: refuse, so that a finished run is not lost)')
    run.add_argument('--test', action='store_true', help='evaluate --resume on the test split and exit')
    run.add_argument('--no-cuda', '--no_cuda', dest='no_cuda', action='store_true',
                     help='use the CPU even when CUDA is available')
    run.add_argument('--log-interval', '--log_interval', dest='log_interval', type=int, default=400,
                     help='batches between training log lines')
    run.add_argument('--heatmap-every', '--heatmap_every', dest='heatmap_every', type=int, default=0, metavar='N',
                     help='draw the attention of a fixed set of valid images (runs/<name>/heatmaps/ and '
                          'TensorBoard) every N epochs and after the last one; 0: never during training, as '
                          'the original (--visualize draws them afterwards)')
    run.add_argument('--visdom', action='store_true',
                     help="the original's flag: its curves and per-epoch attention go to TensorBoard instead "
                          "(tensorboard --logdir runs), the attention every epoch unless --heatmap-every is given")
    run.add_argument('--visdom_port', '--visdom-port', dest='visdom_port', type=int, default=4655,
                     help="accepted for the original's command lines, unused (default: 4655, the original's)")

    use = parser.add_argument_group('seeing and using a trained model (with --resume)')
    use.add_argument('--visualize', action='store_true',
                     help='write attention overlays of a few test images per attribute to runs/<name>/heatmaps/')
    use.add_argument('--report', action='store_true',
                     help='write runs/<name>/report/index.html (offline, no JavaScript): the run, its test '
                          'results, training curves and per attribute attention, retrieval examples, a t-SNE '
                          'map and the AP of each value; with --test also test_results.json (docs/report.md)')
    use.add_argument('--retrieve', metavar='IMAGE', default=None,
                     help='rank the test candidates (or --gallery) by similarity to IMAGE under --attribute')
    use.add_argument('--attribute', default=None, help='attribute name for --retrieve')
    use.add_argument('--topk', type=int, default=10, help='results --retrieve prints and draws')
    use.add_argument('--gallery', metavar='DIR', default=None,
                     help='rank the images of DIR instead of the test candidates')

    table = parser.add_argument_group('result tables')
    table.add_argument('--collect', nargs='+', metavar='RUN', default=None,
                       help='print one markdown table of the test results of these runs (runs/<name> '
                            'folders or their test_results.json) and exit')
    table.add_argument('--collect-out', '--collect_out', dest='collect_out', metavar='FILE', default=None,
                       help='also write the collected table as JSON to FILE')
    table.add_argument('--collect-by', '--collect_by', dest='collect_by', choices=('model', 'run'),
                       default='model', help='one row per model (mean ± std over its runs) or per run')
    return parser


# ----------------------------------------------------------------------------- the configuration

class Resolved(NamedTuple):
    args: config.Config        # every flag's final value, read-only
    checkpoint: dict           # the loaded --resume file, or None
    starts_stage2: bool        # ASENpp stage 2 starting from the weights of a stage-1 checkpoint
    notes: list                # one line per resolution step that changed flags not given
    original: dict = None      # what an authors' checkpoint's keys told of its network, else None
    finished: str = None       # --resume auto of a finished run: the line to say, and nothing to do


def resolve_configuration(argv=None):
    """The configuration, resolved once in this order, each step changing only flags the user did
    not give: the command line -> the dataset's preset -> ASEN++'s stage defaults -> the --resume
    checkpoint's settings -> derived values (ASEN++'s stage, the first epoch); then checked once."""
    parser = get_args_parser()
    draft = config.Draft(vars(parser.parse_args(argv)), config.given_flags(parser, argv))
    if draft.collect:
        config.check_collect(vars(draft), draft.explicit)
        return Resolved(draft.freeze(), None, False, [])
    preset = config.dataset_preset(draft.dataset, draft.no_cuda)
    draft.apply(preset, f'--dataset {draft.dataset} preset')
    if draft.model == 'ASENpp':
        draft.apply(asenpp.stage_defaults(draft.stage or 1, preset), f'ASEN++ stage {draft.stage or 1} defaults')
    checkpoint, from_checkpoint, original = None, set(), None
    if draft.resume == config.AUTO_RESUME:
        checkpoint, finished = continuation(draft)
        if finished:                                    # a requeue of a finished run: nothing to do
            return Resolved(draft.freeze(), None, False, [], finished=finished)
    elif draft.resume:
        checkpoint = checkpoints.load(draft.resume)
    if checkpoint is not None:
        checkpoints.validate(checkpoint, draft.resume)          # every field read below, before use
        from_checkpoint = config.restore_from_checkpoint(draft, checkpoint, f'--resume {draft.resume}')
        original = checkpoints.adopt_original(checkpoint, draft.resume)
        if original is not None:
            config.adopt_original_settings(draft, original, f"--resume {draft.resume} (the authors' layout)")
        config.name_after_checkpoint(draft, f'--resume {draft.resume} (a file outside runs/)')
    starts_stage2 = asenpp.prepare(draft, checkpoint, original, config.is_training(draft))
    config.derive(draft, checkpoint, starts_stage2)
    return Resolved(draft.freeze(from_checkpoint, draft.resume, config.flag_kinds(parser)), checkpoint, starts_stage2, draft.describe(),
                    original)


def continuation(draft):
    """--resume auto (the rule of lib/runfolder.py): (the newest complete snapshot of runs/<name>/,
    loaded and now --resume; None) to continue it, (None, None) with no --resume when the folder holds
    none (the run starts), or (the snapshot, the line to say) when the run already finished."""
    config.check_auto_resume(draft)
    run_dir = os.path.join('runs', draft.name)
    found = checkpoints.newest_snapshot(run_dir)
    if found is None:
        draft.set('resume', None, '--resume auto (no snapshot yet: a new run)')
        return None, None
    path, checkpoint = found
    runfolder.check_same_run(draft, checkpoint.get('args'), path, run_dir, prefix='--resume auto: ')
    draft.set('resume', path, '--resume auto')
    epoch, steps = checkpoints.progress(checkpoint)
    if steps == 0 and epoch >= draft.epochs:
        return checkpoint, runfolder.finished_line(run_dir, path, epoch, draft.epochs)
    return checkpoint, None


# ----------------------------------------------------------------------------- the command

def main(argv=None):
    """The command line: resolve the configuration, prepare the run folder through its one guard
    (lib/runfolder.py: for training, locked, and never replacing another run's files), build the
    network with its weights, then train, or test, retrieve or visualise. Every user mistake,
    stop signal and machine failure is one `error:` line and an exit status (utils.CommandBoundary)."""
    boundary = utils.CommandBoundary()
    # the stop signals from the first moment, before any file is written: a stop before the first
    # snapshot exits 75 too, and the same command starts the run (runtime.StopSignals)
    with boundary, runtime.StopSignals() as signals, signals.errors_as_stops():
        runtime.check_torch_version()
        resolved = resolve_configuration(argv)
        args, training = resolved.args, config.is_training(resolved.args)
        with runtime.distributed_session(args.no_cuda, args.sync_bn):
            if not answered_without_run_folder(resolved):      # --collect, a finished run, --check-data
                device = runtime.resolve_device(args.no_cuda)
                runtime.configure_backends(device, args.tf32)
                utils.seed_everything(args.seed)
                run_dir = os.path.join('runs', args.name)
                if training:                    # the rule first (read-only; checked again under the lock):
                    runfolder.check_recorded_run(run_dir, args, resolved.checkpoint)   # another run is the real mistake
                inputs.check_data_folder(args)              # before the run folder is made
                with runfolder.prepare(run_dir, args, training, device, resolved.checkpoint):
                    logger = open_log(resolved, run_dir, training)
                    split_files = local_first(lambda: inputs.prepare_dataset(args))
                    tnet, checkpoint = network_with_weights(resolved, split_files, device, logger)
                    if training:
                        commands.train(tnet, split_files, device, args, logger, run_dir, checkpoint)
                    else:
                        use_trained(resolved, tnet, split_files, device, logger, run_dir)
    return boundary.status


def answered_without_run_folder(resolved):
    """Answer what needs no run folder and no network (--collect; --resume auto of a finished run,
    which does not touch its folder: no lock, no log line; --check-data) and return True; else
    return False, with --allow-large-images in force."""
    args = resolved.args
    if args.collect:
        tables.collect(args.collect, args.collect_out, args.collect_by)
        return True
    if resolved.finished:
        if is_main_process():
            print(resolved.finished)
        return True
    if args.allow_large_images:
        images.allow_large_images(True)
    if args.check_data:
        datacheck.run(args)
        return True
    return False


def open_log(resolved, run_dir, training):
    """The logger of the run folder's train.log (test.log), rank 0's alone, after saying which run
    folder this run writes to (--resume may have set --name), what the resolution changed, and
    that the original's --visdom is served by TensorBoard."""
    args = resolved.args
    logger = utils.setup_logger(os.path.join(run_dir, 'train.log' if training else 'test.log')) \
        if is_main_process() else runtime.silent_logger()
    origin = ' (--name from the --resume checkpoint)' if resolved.checkpoint is not None and \
        'name' not in args.explicit else ''
    logger.info(f'writing to {run_dir}{os.sep}{origin}')
    for note in resolved.notes:
        logger.info(f'configuration: {note}')
    if args.visdom:
        what = 'curves and attention' if args.heatmap_every > 0 else 'curves'
        logger.info(f'--visdom: {what} go to TensorBoard here: tensorboard --logdir runs')
    return logger


def network_with_weights(resolved, split_files, device, logger):
    """(the triplet-wrapped network with the --resume weights, the checkpoint training continues
    from or None): ASEN++ stage 2 starts from a stage-1 checkpoint's weights alone."""
    args, checkpoint = resolved.args, resolved.checkpoint
    tnet = commands.build_network(args, len(split_files.attributes), device, imagenet=checkpoint is None,
                                  local_imagenet=resolved.starts_stage2)
    logger.info(f'  + Number of params: {sum(p.numel() for p in tnet.parameters())}')
    if resolved.starts_stage2:
        checkpoints.load_stage1_weights(tnet, checkpoint, args.resume, split_files)
        logger.info(f"=> stage 2 starts from the stage-1 weights of '{args.resume}'")
        return tnet, None                     # its optimizer, epoch and RNG belong to stage 1
    if checkpoint is not None:
        checkpoints.load_weights(tnet, checkpoint, args.resume, split_files)
        score = 'accuracy' if args.dataset in config.TRIPLET_DATASETS else 'mAP'
        logger.info(f"=> loaded checkpoint '{args.resume}' (epoch {checkpoint.get('epoch')} "
                    f"{score} on validation set {checkpoint.get('prec')})")
    return tnet, checkpoint


def use_trained(resolved, tnet, split_files, device, logger, run_dir):
    """--retrieve, or --visualize and then --test or --report, with the trained network."""
    args = resolved.args
    if args.retrieve:
        commands.retrieve(tnet, split_files, device, args, run_dir)
        return
    if args.visualize:
        commands.visualize_attention(tnet, split_files, device, args, run_dir)
    if args.test or args.report:
        source = report.Source.of(resolved, get_args_parser()) if args.report else None
        commands.test(tnet, split_files, device, args, logger, run_dir, source)


if __name__ == '__main__':
    sys.exit(main())
