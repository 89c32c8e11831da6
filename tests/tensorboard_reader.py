"""Read the scalar tags of a tensorboardX event file (TFRecord framing, Event protos)."""
import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def scalar_tags(run_dir):
    tags = set()
    for path in Path(run_dir).glob('events.out.tfevents*'):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack('<Q', data[offset:offset + 8])
            record = data[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(record)
            tags.update(value.tag for value in event.summary.value if value.HasField('simple_value'))
    return tags
