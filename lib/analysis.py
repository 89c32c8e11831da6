"""Seeing and using a trained ASEN: attention heatmaps, attention localisation, retrieval."""

import hashlib
import os

import numpy as np
import torch

from lib import checks
from lib.images import load_image
import datasets
import utils
from lib import visualize
from utils import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def samples_per_attribute(retrieval_set, n_attributes, per_attribute):
    """The first `per_attribute` entries of each attribute: [(image path, attribute, entry index)]."""
    samples = []
    for attr in range(n_attributes):
        for index in np.flatnonzero(retrieval_set.entries[:, 1] == attr)[:per_attribute]:
            samples.append((retrieval_set.image_path(index), attr, int(index)))
    return samples


def write_heatmaps(net, split_files, img_size, device, out_dir, per_attribute=4, regions=None):
    """PNG grid of attention overlays for a few test candidates per attribute; returns its path."""
    transform = datasets.build_transform(img_size, train=False)
    candidates = datasets.RetrievalDataset(split_files, 'test', 'candidate', transform)
    samples = samples_per_attribute(candidates, len(split_files.attributes), per_attribute)
    boxes = None
    if regions is not None:
        boxes = [regions[candidates.entries[index, 0], attr] for _, attr, index in samples]
    return visualize.save_attention_grid(net, [(path, attr) for path, attr, _ in samples],
                                         split_files.attributes, transform, device,
                                         os.path.join(out_dir, 'attention_test.png'), regions=boxes,
                                         columns=per_attribute)


@torch.inference_mode()
def attention_localisation(net, retrieval_sets, n_attributes, regions, img_size, device, batch_size=64):
    """Per attribute: (mean attention mass inside its region, mean region share of the view).

    Every image of the (queries, candidates) RetrievalDatasets is scored under its own attribute;
    `regions` (n_images, n_attributes, K, 4) are boxes in original pixel coordinates, a region
    being the union of its K boxes.
    """
    inside, share = [[] for _ in range(n_attributes)], [[] for _ in range(n_attributes)]
    net.eval()
    for dataset in retrieval_sets:
        transform = dataset.transform
        for start in range(0, len(dataset), batch_size):
            rows = range(start, min(start + batch_size, len(dataset)))
            images = [load_image(dataset.image_path(i)) for i in rows]
            attrs = dataset.entries[list(rows), 1]
            batch = torch.stack([transform(img) for img in images]).to(device)
            maps = net.attention_maps(batch, torch.from_numpy(attrs).to(device)).float().cpu()
            boxes = np.stack([regions[dataset.entries[i, 0], dataset.entries[i, 1]] for i in rows])
            sizes = np.array([img.size for img in images])
            mass, area = visualize.localisation_share(maps, boxes, sizes, img_size)
            for attr, m, a in zip(attrs, mass, area):
                inside[attr].append(m)
                share[attr].append(a)
    return [(float(np.mean(i)) if i else 0.0, float(np.mean(s)) if s else 0.0) for i, s in zip(inside, share)]


# ----------------------------------------------------------------------------- retrieval

def gallery_paths(split_files, gallery_dir):
    """Paths to rank: the images of `gallery_dir`, or the distinct test candidate images."""
    if gallery_dir is not None:
        if not os.path.isdir(gallery_dir):
            raise UserError(f"--gallery {gallery_dir}: no such folder")
        paths = sorted(os.path.join(gallery_dir, f) for f in os.listdir(gallery_dir)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise UserError(f"--gallery {gallery_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
        for path in paths:
            check_gallery_file(path)
        return paths
    filenames = split_files.filenames('test')
    ids = np.unique(split_files.retrieval_entries('test', 'candidate')[:, 0])
    return [os.path.join(split_files.root, filenames[i]) for i in ids]


def check_gallery_file(path):
    """A one-line error for a gallery entry that is no regular file (a named pipe would block the
    ranking for ever) or whose name is not UTF-8 (it could not be printed)."""
    try:
        checks.require_utf8_name(path)
        checks.require_regular_file(path, 'image')
    except UserError as err:
        raise UserError(f"--gallery: {err}") from None


@torch.inference_mode()
def embed_paths(net, paths, attr_index, transform, device, batch_size=64):
    """(N, D) float32 embeddings of image files under one attribute."""
    net.eval()
    out = []
    for start in range(0, len(paths), batch_size):
        images = torch.stack([transform(load_image(p)) for p in paths[start:start + batch_size]])
        attr = torch.full((len(images),), attr_index, dtype=torch.long, device=device)
        out.append(net(images.to(device), attr).float().cpu())
    return torch.cat(out)


def file_identity(path):
    """(path, size, mtime in ns): changes when the file is rewritten or replaced."""
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def cache_key(checkpoint_path, attribute, paths, img_size):
    """Changes when the checkpoint file, the attribute, the image size, the gallery's list or any
    gallery image (its size or modification time) does."""
    digest = hashlib.sha1()
    for part in (*file_identity(checkpoint_path), attribute, img_size, *map(file_identity, paths)):
        digest.update(str(part).encode() + b'\0')
    return digest.hexdigest()[:16]


def load_cached(cache, n_rows):
    """The embeddings (n_rows, D) in `cache`, or None when it is absent, damaged or of another size
    (then the caller rebuilds it)."""
    if not os.path.isfile(cache):
        return None
    try:
        embeddings = torch.load(cache, map_location='cpu', weights_only=True)
    except Exception:  # torch raises many types for a truncated or foreign file
        return None
    ok = torch.is_tensor(embeddings) and embeddings.dim() == 2 and len(embeddings) == n_rows
    return embeddings if ok else None


def gallery_embeddings(net, paths, attr_index, attribute, transform, img_size, device, checkpoint_path, cache_dir):
    """Gallery embeddings, cached per checkpoint and attribute under `cache_dir`."""
    cache = os.path.join(cache_dir, f'{attribute}-{cache_key(checkpoint_path, attribute, paths, img_size)}.pt')
    embeddings = load_cached(cache, len(paths))
    if embeddings is not None:
        return embeddings, True
    embeddings = embed_paths(net, paths, attr_index, transform, device)
    utils.save_atomic(embeddings, cache, 'retrieval cache')
    return embeddings, False


def retrieve(net, split_files, args, device, run_dir):
    """Rank the gallery by similarity to --retrieve under --attribute; returns [(rank, score, path)]."""
    if args.attribute not in split_files.attributes:
        raise UserError(f"--attribute {args.attribute!r}: unknown for {args.dataset}; choose one of "
                        f"{', '.join(split_files.attributes)}")
    if not os.path.isfile(args.retrieve):
        raise UserError(f"--retrieve {args.retrieve}: no such image")
    attr_index = split_files.attributes.index(args.attribute)
    transform = datasets.build_transform(args.img_size, train=False)
    paths = gallery_paths(split_files, args.gallery)
    gallery, _ = gallery_embeddings(net, paths, attr_index, args.attribute, transform, args.img_size, device,
                                    args.resume, os.path.join(run_dir, 'retrieval_cache'))
    query = embed_paths(net, [args.retrieve], attr_index, transform, device)[0]
    scores = gallery @ query                                                   # (N,)
    top = torch.argsort(scores, descending=True)[:args.topk]
    results = [(rank, float(scores[i]), paths[i]) for rank, i in enumerate(top.tolist(), start=1)]
    name = os.path.splitext(os.path.basename(args.retrieve))[0]
    grid = os.path.join(run_dir, 'retrieval', f'{name}-{args.attribute}.png')
    visualize.save_retrieval_grid(args.retrieve, [p for *_, p in results], [s for _, s, _ in results], grid)
    return results, grid

