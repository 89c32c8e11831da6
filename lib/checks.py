"""Checks of input files that look fine but are not, shared by the readers (one-line UserErrors).

What a reader of the data meets besides malformed lines: a named pipe, device or socket where a
file should be (opening a FIFO blocks until someone writes to it: for ever, in practice); a UTF-8
byte-order mark (an invisible character glued to the first path or id); bytes that are not UTF-8;
blank lines (in a filenames file a blank line takes an id and shifts every later one); digits
that str.isdigit() accepts but are not ASCII 0-9 ('²', Arabic-Indic digits); a meta.json entry of
the wrong shape or with an attribute named twice.
"""

import os
import stat

from utils import UserError

BOM = b'\xef\xbb\xbf'
ASCII_DIGITS = frozenset('0123456789')

_KINDS = ((stat.S_ISFIFO, 'a named pipe'), (stat.S_ISCHR, 'a character device'),
          (stat.S_ISBLK, 'a block device'), (stat.S_ISSOCK, 'a socket'), (stat.S_ISDIR, 'a folder'))


def file_kind(path):
    """'a named pipe', 'a folder', ... of what is at `path`; None for a regular file or nothing there."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else 'not a regular file'


def require_regular_file(path, what='file'):
    """A UserError unless `path` is a regular file (links followed). Checked before opening, since
    open() on a named pipe waits for a writer for ever."""
    if not os.path.lexists(path):
        raise UserError(f"{path}: {what} not found")
    kind = file_kind(path)
    if kind is not None:
        raise UserError(f"{path}: is {kind}, not a regular file; replace it with the {what} itself")
    if not os.path.exists(path):
        raise UserError(f"{path}: a link to nothing ({os.readlink(path)}); restore the {what} it points to")


def read_bytes(path, what='file'):
    """The bytes of a regular file (a one-line error for anything else)."""
    require_regular_file(path, what)
    with open(path, 'rb') as f:
        return f.read()


def decode_utf8(path, data):
    """`data` as text; a BOM or a byte that is not UTF-8 is a one-line error naming file:line."""
    if data.startswith(BOM):
        # refused rather than stripped: an editor that adds one may change more, and the authors'
        # files have none
        raise UserError(f"{path}:1: starts with a UTF-8 byte-order mark (BOM); save the file as UTF-8 "
                        f"without a BOM")
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as err:
        line = data.count(b'\n', 0, err.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); save the file as "
                        f"UTF-8") from err


def refuse_blank_lines(path, lines, advice):
    """A one-line error at the first blank line of `lines` (1-based numbers); `advice` says why it
    matters and what to do."""
    if '' in lines:
        raise UserError(f"{path}:{lines.index('') + 1}: blank line; {advice}")


def is_id(field):
    """True for a non-negative integer in ASCII digits only (str.isdigit() also takes '²' and '٣')."""
    return bool(field) and set(field) <= ASCII_DIGITS


def printable_name(name):
    """A file name as text that can be printed: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(name).decode('utf-8', 'backslashreplace')


def require_utf8_name(path):
    """A one-line error for a file name holding bytes that are not UTF-8 (os.listdir gives them as
    surrogates, which cannot be printed or written to a log)."""
    try:
        os.fsencode(path).decode('utf-8')
    except UnicodeDecodeError:
        raise UserError(f"{printable_name(path)}: the file name is not UTF-8; rename the file") from None


def check_meta(path, meta, dataset):
    """(ATTRIBUTES, ATTRIBUTES_NUM in that order) of `meta[dataset]`, shape-checked; one-line errors
    name `path`. None when `meta` has no entry for `dataset`."""
    if not isinstance(meta, dict):
        raise UserError(f"{path}: holds a JSON {type(meta).__name__}, not an object mapping dataset names to "
                        f"{{'ATTRIBUTES': [...], 'ATTRIBUTES_NUM': {{...}}}}")
    if dataset not in meta:
        return None
    entry = meta[dataset]
    needs = f"{path}: entry {dataset!r} needs ATTRIBUTES (a list of names) and ATTRIBUTES_NUM (a count for each)"
    if not isinstance(entry, dict) or not isinstance(entry.get('ATTRIBUTES'), list) \
            or not isinstance(entry.get('ATTRIBUTES_NUM'), dict):
        raise UserError(needs)
    names = entry['ATTRIBUTES']
    if not names:
        raise UserError(f"{path}: entry {dataset!r} has no ATTRIBUTES (an empty list); list the dataset's "
                        f"attribute names in ATTRIBUTES and their value counts in ATTRIBUTES_NUM")
    if not all(isinstance(name, str) and name for name in names):
        raise UserError(f"{needs}; ATTRIBUTES holds something other than names")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        # scores are reported by name: a repeated name would show one attribute's mAP under another's
        raise UserError(f"{path}: entry {dataset!r} names attribute {repeated[0]!r} twice in ATTRIBUTES; "
                        f"each attribute needs its own name")
    counts = []
    for name in names:
        count = entry['ATTRIBUTES_NUM'].get(name)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UserError(f"{needs}; ATTRIBUTES_NUM[{name!r}] is {count!r}, not a positive integer")
        counts.append(count)
    return names, counts

