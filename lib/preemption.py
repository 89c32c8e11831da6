"""Preemptible training (docs/preemption.md): one object decides when a training run saves, what it
saves and when a stop signal ends it; the files themselves are written by lib/checkpoints.py."""
import os
import time
from contextlib import contextmanager

import utils
from lib import checkpoints, engine, runtime
from lib.flags import parse_interval
from lib.runtime import is_main_process
from utils import UserError


class Preemption:
    """The snapshots of one training run and its stops, for commands.train:

    - `__init__` restores a --resume snapshot's optimiser, schedule, scaler and RNGs, and keeps the
      best validation score so far (`best_prec`) and a step snapshot's position;
    - `check_processes`, `check_epoch_sizes`: that position against this run, before anything is
      written (a step snapshot continues exactly only with the same streams, processes and sizes);
    - `stops_deferred()`: the training loop, inside which a stop signal waits for a step boundary;
    - `start_epoch`: where the epoch starts (a resumed one at its next step, with its meters);
    - `after_step` (engine.train_one_epoch's hook): a step snapshot every --checkpoint-every steps
      or minutes, and at the first step boundary after a stop signal, which then stops the run;
    - `save_epoch`: the epoch snapshot (and model_best.pth.tar), the step snapshot removed;
    - `stop_if_asked`: a signal that came after the epoch's last step stops the run there.

    In one process the signal flag and the clock are read after every step: Python values, no host
    sync. Under torchrun every rank must stop, and snapshot, after the same step: the ranks agree
    by one small all-reduce (a host sync) every CHECK_STEPS steps and at each due step interval,
    and rank 0's clock alone decides a snapshot due by minutes."""

    CHECK_STEPS = 10

    def __init__(self, tnet, optimizer, scheduler, scaler, args, run_dir, device, checkpoint):
        self.tnet, self.optimizer, self.scheduler, self.scaler = tnet, optimizer, scheduler, scaler
        self.args, self.run_dir, self.device = args, run_dir, device
        self.best_prec = checkpoints.restore_training_state(checkpoint, optimizer, scheduler, scaler)
        self.position = checkpoints.step_position(checkpoint)
        self.every_steps, self.every_seconds = parse_interval(args.checkpoint_every)
        self.streams, self.steps_per_epoch, self.signals = None, None, None
        self.epoch, self.pass_rng = None, None
        self.restart()

    # ------------------------------------------------------------------ the position, checked

    def check_processes(self, streams, world):
        """A step snapshot continues exactly only with the flip streams (--workers) and processes it
        was written with; `streams` is what this run's step snapshots record."""
        self.streams = streams
        position, path = self.position, self.args.resume
        if position is None:
            return
        if int(position['world']) != world:
            raise UserError(f"--resume {path}: a step snapshot of {int(position['world'])} process(es), this run "
                            f"has {world}; the triplet shards would differ: start it with as many")
        if int(position['streams']) != streams:
            workers = int(position['streams'])
            raise UserError(f"--resume {path}: a step snapshot of a run with {workers if workers > 1 else '0 or 1'} "
                            f"loader worker(s) (--workers), this run has {streams if streams > 1 else '0 or 1'}; "
                            f"the random flips would differ: pass the same --workers")

    def check_epoch_sizes(self, steps_per_epoch, triplets, rank):
        """A step snapshot's position against this run's own sizes, before anything is written: its
        epoch is the one this run starts (and within --epochs), its steps within the epoch's, and
        this rank's meter row the running sums of exactly the triplets of those steps."""
        self.steps_per_epoch = steps_per_epoch
        position, args = self.position, self.args
        if position is None:
            return
        damaged = f"--resume {args.resume}: a step snapshot"
        epoch, batch = position['epoch'], position['batch']
        if epoch > args.epochs or epoch != args.start_epoch:
            raise UserError(f"{damaged} of epoch {epoch}, but this run trains epochs {args.start_epoch} to "
                            f"{args.epochs}; the file is damaged, or give the --epochs it was written with")
        if batch > steps_per_epoch:
            raise UserError(f"{damaged} after step {batch} of epoch {epoch}, but an epoch of this run has "
                            f"{steps_per_epoch} steps; the file is damaged, or give the --num_triplets and "
                            f"--batch-size it was written with")
        row = dict(zip(engine.METER_FIELDS, position['meters'][rank].tolist()))
        seen = min(batch * args.batch_size, triplets)
        if row['count'] != seen or not (0 <= row['acc_sum'] <= seen and 0 <= row['acc_last'] <= 1):
            raise UserError(f"{damaged}: its meters (count {row['count']:g}, accuracy sum {row['acc_sum']:g}, "
                            f"loss sum {row['loss_sum']:g}) are not those of {seen} triplets in {batch} step(s); "
                            f"the file is damaged; continue from the epoch snapshot or start anew")

    # ------------------------------------------------------------------ the training loop

    @contextmanager
    def stops_deferred(self):
        """The training loop: a stop signal waits for the next step boundary (runtime.StopSignals)."""
        with runtime.stop_signals_deferred() as self.signals:
            self.restart()
            yield self

    def start_epoch(self, epoch):
        """(first batch, running meters or None) of epoch `epoch`: a resumed step snapshot's epoch
        continues at its next step with its meters. Called once the epoch's triplets are drawn
        (set_epoch): the RNGs are then the pass's start, which a step snapshot keeps."""
        self.epoch = epoch
        resumed = self.position is not None and self.position['epoch'] == epoch
        first_batch = int(self.position['batch']) if resumed else 0
        rank = runtime.rank_and_world()[0]
        meters = engine.meters_from_row(self.position['meters'][rank], self.device) if resumed else None
        self.pass_rng = utils.rng_state()
        return first_batch, meters

    def after_step(self, steps_done, meters, check_finite):
        """After each training step: the step snapshot when one is due (`check_finite()` first raises
        a pending non-finite loss, so that no diverged weights are saved), then the stop if asked."""
        snapshot_now, stop = self._due_after_step()
        if not snapshot_now:
            return
        check_finite()
        meter_rows = runtime.gather_from_ranks(engine.meter_row(meters, self.device)).cpu()
        state = checkpoints.step_snapshot(self.epoch, steps_done, meter_rows, self.pass_rng, self.streams, self.tnet,
                                          self.optimizer, self.scheduler, self.scaler, self.best_prec, self.args)
        path = os.path.join(self.run_dir, checkpoints.STEP_SNAPSHOT)
        if is_main_process():                   # every rank holds the same weights: rank 0 writes them
            path = checkpoints.save_step_snapshot(state, self.run_dir)
        self.restart()
        if stop:
            raise self._stopped(f'epoch {self.epoch}, step {steps_done} of {self.steps_per_epoch}', path)

    def save_epoch(self, epoch, prec):
        """The epoch snapshot checkpoint.pth.tar, and model_best.pth.tar when `prec` is the best
        validation score yet; the step snapshot before it is then stale and removed."""
        is_best = prec > self.best_prec
        self.best_prec = max(prec, self.best_prec)
        if is_main_process():
            checkpoints.save_snapshot(checkpoints.snapshot(epoch, self.tnet, self.optimizer, self.scheduler,
                                                           self.scaler, prec, self.best_prec, self.args),
                                      self.run_dir, is_best)
            checkpoints.remove_step_snapshot(self.run_dir)

    def stop_if_asked(self, epoch):
        """After the epoch's records: stop when a signal came since its last step (during the
        evaluation); after the last epoch there is nothing left to continue, and the run ends."""
        self.restart()
        if epoch < self.args.epochs and self._decide(steps_due=False)[1]:
            raise self._stopped(f'the end of epoch {epoch}', os.path.join(self.run_dir, 'checkpoint.pth.tar'))

    # ------------------------------------------------------------------ the schedule

    def restart(self):
        """A snapshot (step or epoch) was written: the interval counts from now."""
        self.count, self.since = 0, time.monotonic()

    def _due_after_step(self):
        """(write a step snapshot now, stop after it) for the step just done."""
        self.count += 1
        steps_due = self.every_steps is not None and self.count % self.every_steps == 0
        if runtime.distributed() and not (steps_due or self.count % self.CHECK_STEPS == 0):
            return False, False
        return self._decide(steps_due)

    def _decide(self, steps_due):
        late = self.every_seconds is not None and time.monotonic() - self.since >= self.every_seconds \
            and runtime.rank_and_world()[0] == 0
        stop, late = runtime.max_of_ranks([int(self.signals.requested), int(late)], self.device)
        return bool(steps_due or late or stop), bool(stop)

    def _stopped(self, where, path):
        """The Stopped error of the stop signal served at `where`, the snapshot `path` written."""
        return runtime.Stopped(f"stopped by {self.signals.signal_name} at {where}; saved {path}; continue with the "
                               f"same command and --resume auto (exit status {runtime.REQUEUE_EXIT}: requeue)")
