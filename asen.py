"""Train and test ASEN (Ma et al., AAAI 2020): the entry point.

    python asen.py --dataset FashionAI                                   # train
    python asen.py --test --resume runs/ASEN/model_best.pth.tar          # test
    python asen.py --dataset SynthFashion                                # offline CPU demo

This file dispatches to the commands (lib/commands.py); the flags and their rules are lib/flags.py,
the resolution of the configuration lib/config.py, the loops lib/engine.py, the networks model.py,
the loss losses.py.
"""
import os
import sys

import utils
from utils import UserError
from lib import checkpoints, commands, config, inputs, runfolder, runtime, tables
from lib import datacheck, images, report
from lib.config import Resolved, continuation, get_args_parser, resolve_configuration  # noqa: F401
from lib.runtime import is_main_process, local_first


# ----------------------------------------------------------------------------- dispatch

def run(resolved):
    """Prepare the run folder through its one guard (lib/runfolder.py: for training, locked, and
    never replacing another run's files), then run the command."""
    args = resolved.args
    if args.collect:
        return tables.collect(args.collect, args.collect_out, args.collect_by)
    if resolved.finished:                   # the run folder is not touched: no lock, no log line
        if is_main_process():
            print(resolved.finished)
        return None
    if args.allow_large_images:
        images.allow_large_images(True)
    if args.check_data:
        return datacheck.run(args)
    device = runtime.resolve_device(args.no_cuda)
    runtime.configure_backends(device, args.tf32)
    utils.seed_everything(args.seed)
    run_dir = os.path.join('runs', args.name)
    training = config.is_training(args)
    if training:                                # the rule first (read-only; checked again under the lock):
        runfolder.check_recorded_run(run_dir, args, resolved.checkpoint)   # another run is the real mistake
    inputs.check_data_folder(args)              # before the run folder is made
    with runfolder.prepare(run_dir, args, training, device, resolved.checkpoint):
        return dispatch(resolved, run_dir, device)


def dispatch(resolved, run_dir, device):
    """Build the network with its weights, then train, test, retrieve or visualise."""
    args, checkpoint = resolved.args, resolved.checkpoint
    training = config.is_training(args)
    logger = utils.setup_logger(os.path.join(run_dir, 'train.log' if training else 'test.log')) \
        if is_main_process() else runtime.silent_logger()
    log_invocation(resolved, run_dir, logger)
    split_files = local_first(lambda: inputs.prepare_dataset(args))
    tnet = commands.build_network(args, len(split_files.attributes), device, imagenet=checkpoint is None,
                                  local_imagenet=resolved.starts_stage2)
    logger.info(f'  + Number of params: {sum(p.numel() for p in tnet.parameters())}')
    if resolved.starts_stage2:
        checkpoints.load_stage1_weights(tnet, checkpoint, args.resume, split_files)
        logger.info(f"=> stage 2 starts from the stage-1 weights of '{args.resume}'")
        checkpoint = None                     # its optimizer, epoch and RNG belong to stage 1
    if checkpoint is not None:
        checkpoints.load_weights(tnet, checkpoint, args.resume, split_files)
        score = 'accuracy' if args.dataset in config.TRIPLET_DATASETS else 'mAP'
        logger.info(f"=> loaded checkpoint '{args.resume}' (epoch {checkpoint.get('epoch')} "
                    f"{score} on validation set {checkpoint.get('prec')})")
    if args.retrieve:
        return commands.retrieve(tnet, split_files, device, args, run_dir)
    if args.visualize:
        commands.visualize_attention(tnet, split_files, device, args, run_dir)
    if args.test or args.report:
        source = report.Source.of(resolved, get_args_parser()) if args.report else None
        return commands.test(tnet, split_files, device, args, logger, run_dir, source)
    if training:
        return commands.train(tnet, split_files, device, args, logger, run_dir, checkpoint)
    return None


def log_invocation(resolved, run_dir, logger):
    """Say which run folder this run writes to (--resume may have set --name), what the
    resolution changed, and that the original's --visdom is served by TensorBoard."""
    args = resolved.args
    origin = ' (--name from the --resume checkpoint)' if resolved.checkpoint is not None and \
        'name' not in args.explicit else ''
    logger.info(f'writing to {run_dir}{os.sep}{origin}')
    for note in resolved.notes:
        logger.info(f'configuration: {note}')
    if args.visdom:
        what = 'curves and attention' if args.heatmap_every > 0 else 'curves'
        logger.info(f'--visdom: {what} go to TensorBoard here: tensorboard --logdir runs')


def main(argv=None):
    """The command line; every user mistake and machine failure is one `error:` line."""
    def work():
        # the stop signals from the first moment, before any file is written: a stop before the
        # first snapshot exits 75 too, and the same command starts the run (runtime.StopSignals)
        with runtime.StopSignals() as signals:
            try:
                runtime.check_torch_version()
                resolved = resolve_configuration(argv)
                with runtime.distributed_session(resolved.args.no_cuda, resolved.args.sync_bn):
                    run(resolved)
            except (UserError, KeyboardInterrupt, OSError) as err:
                if signals.requested and not isinstance(err, runtime.Stopped):
                    # what the signal broke on its way (a read wrapped in its own error line)
                    raise signals.stopped_outside_training() from err
                raise
    return utils.run_command(work)


if __name__ == '__main__':
    sys.exit(main())
