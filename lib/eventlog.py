"""TensorBoard's event file for a run (`RunWriter`), whose write errors reach the command's one-line
boundary (utils.run_command) instead of a thread's traceback and a hang."""

from tensorboardX import SummaryWriter

from utils import UserError, describe_write_error


class RunWriter:
    """A tensorboardX SummaryWriter on `run_dir` that raises, from its next call in the main thread,
    the first error its background thread met writing the event file.

    tensorboardX writes and flushes the event file from a daemon thread. Left alone, a write error
    there (a full disk, a folder made read-only) prints that thread's traceback and ends it; its
    queue then fills up and the next add_scalar blocks forever. Here the thread's writes keep the
    error instead of raising it, so the thread goes on emptying the queue, and add_scalar,
    add_image and close raise it as one UserError line."""

    def __init__(self, run_dir):
        self.run_dir, self.error = run_dir, None
        self.writer = SummaryWriter(run_dir)
        # what the thread writes with (tensorboardX's EventsWriter); another layout keeps its own ways
        events = getattr(getattr(self.writer._get_file_writer(), 'event_writer', None), '_ev_writer', None)
        for name in ('write_event', 'flush') if events is not None else ():
            setattr(events, name, self._keeping_errors(getattr(events, name)))

    def _keeping_errors(self, write):
        def kept(*args):
            try:
                return write(*args)
            except OSError as err:
                self.error = self.error or err
        return kept

    def _check(self):
        if self.error is not None:
            raise UserError(f"cannot write the TensorBoard events in {self.run_dir}: "
                            f"{describe_write_error(self.error)}") from self.error

    def add_scalar(self, *args, **kwargs):
        self._check()
        self.writer.add_scalar(*args, **kwargs)

    def add_image(self, *args, **kwargs):
        self._check()
        self.writer.add_image(*args, **kwargs)

    def close(self):
        """Flush what is queued (in this thread), stop the thread, close the file; then raise an
        error met on the way."""
        try:
            self.writer.close()
        except OSError as err:                        # closing the file flushes what it buffers
            self.error = self.error or err
        self._check()
