"""lib/eventlog.RunWriter: a failure of TensorBoard's background writer thread is one error line."""
import errno

import pytest
from tensorboardX import record_writer

import asen
from conftest import TINY
from lib.eventlog import RunWriter
from utils import UserError


class FillsUp:
    """An event file on a disk that fills up after its first `room` writes."""

    def __init__(self, path, room):
        self.file, self.room = open(path, 'wb'), room

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, 'No space left on device')
        self.room -= 1
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


@pytest.fixture()
def disk_fills_up(monkeypatch):
    """Event files take the first event (4 writes, in the main thread: SummaryWriter's), then fail."""
    monkeypatch.setattr(record_writer, 'open_file', lambda path: FillsUp(path, room=4))


def test_a_write_error_in_the_writer_thread_is_raised_in_the_main_thread(tmp_path, disk_fills_up):
    writer = RunWriter(str(tmp_path))
    for step in range(50):                   # more than the queue holds: the thread keeps emptying it
        try:
            writer.add_scalar('x', step, step)
        except UserError:
            break
    with pytest.raises(UserError, match='cannot write the TensorBoard events in .*No space left on device'):
        writer.close()


def test_training_on_a_full_disk_stops_with_one_error_line(workdir, disk_fills_up, capsys):
    assert asen.main(TINY + ['--epochs', '1', '--name', 'full']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: cannot write the TensorBoard events in runs/full: No space left on device')
    assert len(err.strip().splitlines()) == 1, err
