"""Metrics, checkpoints, seeding and logging shared by the ASEN entry point.

The retrieval metric follows the authors' evaluation (Ma et al., AAAI 2020, Sec. 4.1): for each
attribute, its queries are ranked against its candidates by dot-product similarity, AP is taken
over the full ranking and averaged over queries; MeanAP weights the attributes by query count.
"""
import json
import logging
import os
import random
import sys
import tempfile
import warnings

import numpy as np
import torch


class UserError(Exception):
    """A mistake in the user's input (flag, file, data): reported as one line, no traceback."""


def check_positive(args, keys):
    """A one-line error for the first flag of `keys` whose value is not positive."""
    for key in keys:
        if getattr(args, key) <= 0:
            raise UserError(f"--{key} must be positive, got {getattr(args, key)}")


# ----------------------------------------------------------------------------- metrics

def _as_tensor(x):
    return x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))


def average_precisions(cand_set, queries, c_gdtruth, q_gdtruth, chunk_size=1024):
    """AP of every query over the full ranking of the candidates, as a float64 tensor (Q,).

    AP = (1/R) * sum over relevant ranks k of precision@k; 0 when a query has R = 0 relevant
    candidates. Queries are processed in chunks so memory grows with the number of candidates,
    not queries x candidates. Only the relevant positions of each ranking are visited after the
    sort: the j-th relevant candidate at rank r adds j / r.
    """
    cand_set, queries = _as_tensor(cand_set), _as_tensor(queries)
    device = cand_set.device
    c_gdtruth, q_gdtruth = _as_tensor(c_gdtruth).to(device), _as_tensor(q_gdtruth).to(device)
    queries = queries.to(device, cand_set.dtype)
    aps = [torch.zeros(0, dtype=torch.float64, device=device)]
    for start in range(0, queries.shape[0], chunk_size):
        sims = queries[start:start + chunk_size] @ cand_set.T                       # (q, C)
        relevant = ranked_relevance(sims, c_gdtruth[None, :] == q_gdtruth[start:start + chunk_size, None])
        rows, cols = relevant.nonzero(as_tuple=True)                                # row-major order
        n_relevant = relevant.sum(dim=1)                                            # (q,)
        first = torch.cumsum(n_relevant, 0) - n_relevant                            # (q,) offsets
        nth = torch.arange(len(rows), device=device) - first[rows] + 1             # j of each hit
        contrib = nth.double() / (cols + 1).double()                                # j / rank
        precision_sum = torch.zeros(len(n_relevant), dtype=torch.float64, device=device)
        precision_sum.index_add_(0, rows, contrib)
        aps.append(torch.where(n_relevant > 0, precision_sum / n_relevant.clamp(min=1), 0.0))
    return torch.cat(aps).cpu()


_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def ranked_relevance(sims, relevant):
    """(q, C) relevance flags reordered by descending similarity in each row.

    Rather than an argsort and a gather, the flag is packed into the lowest mantissa bit of each
    similarity and the packed values alone are sorted (NumPy's SIMD sort on the CPU, several
    times faster than an argsort). Packing moves a score by at most one ulp, so only candidates
    whose scores are within one ulp of each other may change places; the original's argsort
    orders exact ties arbitrarily too.
    """
    if sims.dtype not in _SAME_SIZE_INT:
        sims = sims.float()
    int_type = _SAME_SIZE_INT[sims.dtype]
    bits = sims.contiguous().view(int_type)
    keys = ((bits & ~1) | relevant.to(int_type)).view(sims.dtype)                  # (q, C)
    if keys.device.type == 'cpu':
        keys = torch.from_numpy(np.sort(keys.numpy(), axis=1))                      # ascending
    else:
        keys = torch.sort(keys, dim=1).values
    return (keys.flip(1).view(int_type) & 1).bool()                                 # descending


def mean_average_precision(cand_set, queries, c_gdtruth, q_gdtruth):
    """mAP of one attribute: mean AP of `queries` (Q, D) against `cand_set` (C, D).

    Same argument order and meaning as the authors' function; numpy arrays or torch tensors in,
    a Python float in [0, 1] out (0 when there are no queries).
    """
    aps = average_precisions(cand_set, queries, c_gdtruth, q_gdtruth)
    return float(aps.mean()) if aps.numel() else 0.0


def triplet_accuracy(sim_an, sim_ap):
    """Share of triplets whose anchor is more similar to the positive than to the negative, as a
    0-dim float tensor on the inputs' device (reading it is the caller's host sync)."""
    return (sim_ap > sim_an).float().mean()


class DeviceMeter:
    """Last value and weighted running average of a 0-dim tensor, kept on its device: `update`
    queues two small device ops and never waits for the device; `read` waits once. The sums are
    float64, as the Python floats of a per-step `.item()` loop."""

    def __init__(self, device):
        self.last = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def update(self, value, n=1):
        self.last = value.detach().double()
        self.sum = self.sum + self.last * n
        self.count += n

    def read(self):
        """(last value, average) as Python floats: one host sync."""
        last, total = torch.stack([self.last, self.sum]).tolist()
        return last, total / max(self.count, 1)


# ----------------------------------------------------------------------------- seeding

def seed_everything(seed):
    """Seed Python `random`, numpy and torch (the original code forgot `random`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """All global RNG states, as types that `torch.load(weights_only=True)` accepts."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        'python': [version, list(internal), gauss],
        'numpy': [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state` returned."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state['numpy']
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, then rename: a kill never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.pth.tar')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write checkpoint {path}: {err.strerror or err}; free disk space "
                        f"or choose another --name; the previous snapshot is kept") from err
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, flag='--resume', expected='runs/<name>/checkpoint.pth.tar or model_best.pth.tar'):
    """Load a checkpoint safely (weights_only=True: no code runs), with one-line errors naming `flag`
    (and, for a missing file, what `expected` it to be)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; check the path ({expected})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise UserError(f"{flag} {path}: cannot be loaded as a checkpoint ({type(err).__name__}); it is "
                        f"corrupt, truncated, or holds objects other than weights, which are refused "
                        f"so that a downloaded file cannot run code") from err


def write_json(obj, path):
    """Write JSON atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- logging

def setup_logger(log_file=None):
    """Console logger in the original's format, also writing to `log_file` when given."""
    logger = logging.getLogger('asen')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter('%(asctime)s - %(name)s - %(levelname)s - %(message)s')
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger
