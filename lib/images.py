"""Reading images as the authors' loader does (PIL, RGB), with one-line errors for what is not a
readable image: missing or non-regular files, unsupported or 16-bit modes, truncated JPEGs, and
images over PIL's pixel limit (its decompression-bomb guard, lifted by --allow-large-images)."""

import contextlib
import os
import re
import warnings

import numpy as np
from PIL import Image

from lib import checks
from utils import UserError


def load_image(path):
    """An 8-bit RGB PIL image; a missing, unreadable, non-regular or too large file raises a UserError
    naming it."""
    try:
        checks.require_regular_file(path, 'image')
        with refusing_large_images(), Image.open(path) as img:
            return to_rgb(img, path)
    except UserError as err:
        if not os.path.lexists(path):
            raise UserError(f"image {path} is listed but missing; restore it or fix the filenames file") from err
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"image {path}: {too_large_message(bomb_detail(err))}") from err
    except (OSError, ValueError) as err:
        raise UserError(f"image {path} cannot be read ({err}); replace it") from err


# ----------------------------------------------------------------------------- very large images
#
# PIL refuses images of more than 2 * Image.MAX_IMAGE_PIXELS pixels (DecompressionBombError) and
# warns above MAX_IMAGE_PIXELS: a small file can hold a huge image that would fill the memory when
# decoded. Both are refused here, by name, unless allow_large_images(True) (asen.py's
# --allow-large-images) lifts the limit. The switch is also kept in the environment so that data
# loading processes started without fork inherit it.

PIL_PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS
ALLOW_LARGE_IMAGES_ENV = 'ASEN_ALLOW_LARGE_IMAGES'


def allow_large_images(allow=True):
    """Lift (True) or restore (False) PIL's pixel limit for this process and its children."""
    Image.MAX_IMAGE_PIXELS = None if allow else PIL_PIXEL_LIMIT
    if allow:
        os.environ[ALLOW_LARGE_IMAGES_ENV] = '1'
    else:
        os.environ.pop(ALLOW_LARGE_IMAGES_ENV, None)


def too_large_message(detail):
    return (f"too large to decode safely ({detail}); a decompression bomb? check the image, or pass "
            f"--allow-large-images if it is wanted")


def bomb_detail(err):
    """PIL's decompression-bomb message with the limit that is refused here: PIL's error above twice
    Image.MAX_IMAGE_PIXELS names that double; its warning, raised as an error here, names the limit."""
    found = re.search(r'\((\d+) pixels\)', str(err))
    if found is None or Image.MAX_IMAGE_PIXELS is None:
        return str(err)
    return f"{found.group(1)} pixels, over PIL's limit of {Image.MAX_IMAGE_PIXELS} (Image.MAX_IMAGE_PIXELS)"


@contextlib.contextmanager
def refusing_large_images():
    """PIL's DecompressionBombWarning raised as an error inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        yield


def pixel_limit_problem(width, height):
    """Why a width x height image is refused as too large, or None."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or width * height <= limit:
        return None
    return too_large_message(f"{width}x{height} = {width * height} pixels, over PIL's limit of {limit} "
                             f"(Image.MAX_IMAGE_PIXELS)")


if os.environ.get(ALLOW_LARGE_IMAGES_ENV) == '1':
    allow_large_images(True)


# 16-bit grey (PNG 'I;16', or 'I' as some decoders give it): values 0..65535.
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
# Modes with no single 8-bit reading: refused by name.
REFUSED_MODES = {'F': '32-bit floating-point pixels have no standard 8-bit scale'}


def has_alpha(img):
    return img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info


def to_rgb(img, path):
    """8-bit RGB of any PIL mode: 16-bit grey scaled by 255/65535 (convert('RGB') clips it to white),
    transparency laid over white (convert('RGB') would show whatever colour the transparent
    pixels hold, often black), the rest by PIL's convert. Refused modes raise a UserError."""
    if img.mode in REFUSED_MODES:
        raise UserError(f"image {path} has mode {img.mode}: {REFUSED_MODES[img.mode]}; save it as 8-bit RGB")
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float64)                                  # (H, W) 0..65535
        grey = np.clip(np.rint(grey * (255 / 65535)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert('RGB')
    if has_alpha(img):
        rgba = img.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba).convert('RGB')
    return img.convert('RGB')


_CHECKED = {}        # path: (its stat signature, image_problem's answer), filled by remember_problems


def _signature(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino, Image.MAX_IMAGE_PIXELS      # the limit changes the answer


def remember_problems(paths, problems):
    """Keep what a check (lib/datacheck.py, in other processes) found, so that the datasets' own
    scan of the same images, before training, does not read every header again; an image changed
    since (size, mtime or inode), or a changed pixel limit, reads it again."""
    for path, problem in zip(paths, problems):
        signature = _signature(path)
        if signature is not None:
            _CHECKED[path] = (signature, problem)


def image_problem(path):
    """None if `path` is an image load_image can use (judged from its header), else why not."""
    known = _CHECKED.get(path)
    if known is not None and known[0] == _signature(path):
        return known[1]
    if not os.path.lexists(path) or not os.path.exists(path):
        return 'missing'
    kind = checks.file_kind(path)
    if kind is not None:
        return f'{kind}, not an image file'        # opening a named pipe would wait for ever
    if looks_like_whole_jpeg(path):
        # the common case, without PIL: every JPEG mode loads; only the size is read
        return pixel_limit_problem(*jpeg_size(path))
    try:
        with refusing_large_images():
            with Image.open(path) as img:
                mode, image_format = img.mode, img.format
                img.verify()                        # PNG: every chunk's CRC, so a cut PNG fails here
            if image_format == 'JPEG':              # no end marker: maybe cut short; decode to be sure
                with Image.open(path) as img:
                    img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return too_large_message(bomb_detail(err))
    except (OSError, SyntaxError, ValueError) as err:
        return f'unreadable: {err}'
    if mode in REFUSED_MODES:
        return f'mode {mode}: {REFUSED_MODES[mode]}'
    return None


def looks_like_whole_jpeg(path):
    """Starts with JPEG's start-of-image marker and ends in its end-of-image marker FF D9 (a download
    cut short does not; PIL's verify() does not look)."""
    with open(path, 'rb') as f:
        head = f.read(3)
        f.seek(max(os.path.getsize(path) - 64, 0))
        tail = f.read()
    return head == b'\xff\xd8\xff' and tail.rstrip(b'\0\r\n ').endswith(b'\xff\xd9')


# start-of-frame markers (they hold the size): C0-CF but C4 (DHT), C8 (JPG), CC (DAC)
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD9)) | {0x01}        # RSTn, SOI, TEM: no length


def jpeg_size(path):
    """(width, height) from a JPEG's frame header, read by walking the markers; (0, 0) when there is
    none before the scan (PIL then reports the file when it is opened)."""
    with open(path, 'rb') as f:
        f.seek(2)
        while True:
            byte = f.read(1)
            while byte == b'\xff':                 # fill bytes before a marker
                byte = f.read(1)
            if not byte or byte[0] in (0xDA, 0xD9):  # start of scan or end of image: no frame header
                return 0, 0
            marker = byte[0]
            if marker in JPEG_STANDALONE_MARKERS:
                continue
            header = f.read(7)
            if len(header) < 2:
                return 0, 0
            if marker in JPEG_FRAME_MARKERS and len(header) == 7:
                height, width = int.from_bytes(header[3:5], 'big'), int.from_bytes(header[5:7], 'big')
                return width, height
            f.seek(int.from_bytes(header[:2], 'big') - len(header), os.SEEK_CUR)


def bad_image_ids(root, filenames, ids, listing, skip_bad):
    """Ids among `ids` whose image cannot be used, found before training starts (each image's
    header is read: a missing, undecodable or refused-mode image is found here, not mid-epoch).

    Without `skip_bad` the first bad image is an error naming it; with it, the bad images are
    returned so the caller can drop them.
    """
    bad, first_problem = [], None
    for image_id in np.unique(ids):
        problem = image_problem(os.path.join(root, filenames[image_id]))
        if problem is not None:
            bad.append(image_id)
            first_problem = first_problem or problem
    if bad and not skip_bad:
        raise UserError(f"{len(bad)} image(s) listed in {listing} are missing or unreadable under {root}, e.g. "
                        f"{filenames[bad[0]]} ({first_problem}); restore or download the images as the "
                        f"docs/datasets.md says (python asen.py --check-data counts them), or pass --skip-bad-images to leave them out")
    return np.asarray(bad, dtype=np.int64)
