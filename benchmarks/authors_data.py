"""Authors'-format data at FashionAI's image size, for timing epochs as a FashionAI run would see them.

SynthFashion's figures are rendered directly at --jpeg-size px (default 512, about the size of
FashionAI's JPEGs) by the project's own generator (synthfashion.generate, in --workers processes)
and laid out as the authors' FashionAI split files: OUT/meta.json holds the dataset's ATTRIBUTES
and ATTRIBUTES_NUM under --name (default FashionAI), and OUT/<name>/ holds filenames_<split>.txt,
label_train.txt, query_/candidate_<split>.txt and images/; SynthFashion's own meta.json,
settings.json and regions files are left out, so asen reads it exactly as the authors' data:

    python benchmarks/authors_data.py OUT --train 2000 --eval 300       # 2600 JPEGs of 512 px
    python asen.py --dataset FashionAI --data_path OUT --no-pretrained ...

The attributes are SynthFashion's five, not FashionAI's eight; only the image format, size and
file layout are FashionAI's. An OUT/<name> that is complete with the same sizes is kept.
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import synthfashion  # noqa: E402  (the project's generator)


def layout_key(n_train, n_eval, jpeg_size):
    return {'n_train': n_train, 'n_eval': n_eval, 'jpeg_size': jpeg_size, 'synthfashion': synthfashion.DEFAULT_SETTINGS}


def write(out, n_train, n_eval, jpeg_size=512, workers=1, name='FashionAI'):
    """Write (or keep, if up to date) the dataset `name` under `out`; returns True when written."""
    folder = os.path.join(out, name)
    key_path = os.path.join(out, f'.{name}-authors-data.json')
    key = layout_key(n_train, n_eval, jpeg_size)
    if os.path.isfile(key_path) and os.path.isfile(os.path.join(folder, 'filenames_test.txt')):
        with open(key_path) as f:
            if json.load(f) == key:
                return False
    os.makedirs(out, exist_ok=True)
    synthfashion.generate(folder, workers=workers, image_size=jpeg_size, n_train=n_train, n_valid=n_eval,
                          n_test=n_eval)
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)[synthfashion.DATASET_NAME]
    for extra in ['meta.json', 'settings.json'] + [f'regions_{s}.txt' for s in synthfashion.SPLITS]:
        os.remove(os.path.join(folder, extra))
    shared_meta = os.path.join(out, 'meta.json')
    entries = {}
    if os.path.isfile(shared_meta):
        with open(shared_meta) as f:
            entries = json.load(f)
    entries[name] = {'ATTRIBUTES': meta['ATTRIBUTES'], 'ATTRIBUTES_NUM': meta['ATTRIBUTES_NUM']}
    with open(shared_meta, 'w') as f:
        json.dump(entries, f, indent=2)
    with open(key_path, 'w') as f:
        json.dump(key, f)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('out', help='data folder (asen --data_path)')
    parser.add_argument('--train', type=int, default=2000, help='training images')
    parser.add_argument('--eval', type=int, default=300, help='valid and test images each (at least 10)')
    parser.add_argument('--jpeg-size', type=int, default=512, help='side of the square JPEGs, px')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='rendering processes')
    parser.add_argument('--name', default='FashionAI', help='dataset name (asen --dataset)')
    parser.add_argument('--force', action='store_true', help='rewrite even when up to date')
    args = parser.parse_args(argv)
    if min(args.train, args.jpeg_size, args.workers) <= 0 or args.eval < 2 * len(synthfashion.ATTRIBUTES):
        parser.error(f'--train, --jpeg-size, --workers must be positive and --eval at least '
                     f'{2 * len(synthfashion.ATTRIBUTES)}')
    if args.force:
        shutil.rmtree(os.path.join(args.out, args.name), ignore_errors=True)
        key_path = os.path.join(args.out, f'.{args.name}-authors-data.json')
        if os.path.isfile(key_path):
            os.remove(key_path)
    written = write(args.out, args.train, args.eval, args.jpeg_size, args.workers, args.name)
    print(f"{'wrote' if written else 'kept'} {args.train} + {args.eval} + {args.eval} JPEGs of {args.jpeg_size} px "
          f"in {os.path.join(args.out, args.name)} (authors' format)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
