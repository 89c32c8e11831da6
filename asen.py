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
from lib import checkpoints, commands, config, inputs, runfolder, runtime, tables
from lib import datacheck, images, report
from lib.config import get_args_parser, resolve_configuration
from lib.runtime import is_main_process, local_first


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
