"""Images/s of one full ASEN training step (forward, triplet loss, backward, Adam) on synthetic data.

Each configuration builds a fresh network (torch.manual_seed(0)), runs --warmup untimed steps and
--steps timed ones through the project's code: model.build_model, model.TripletWrapper,
runtime.adam (fused on CUDA), a GradScaler as asen uses it, runtime.configure_backends
(cudnn.benchmark on CUDA), and the training step itself, engine.training_step. As in asen's
training loop, no step waits for the device: the loss is read once, after the timed steps.
Suffixes add torch.compile in a mode: ' +compile' (default), ' +reduce-overhead' and
' +max-autotune' (both replay CUDA graphs).

    python benchmarks/bench_train_step.py                    # ResNet-50, 224 px, 16 triplets
    python benchmarks/bench_train_step.py --compile          # also the torch.compile (default mode) variants
    python benchmarks/bench_train_step.py --configs "fp32 3-forward (original)" "bf16 channels_last concat"
"""
import argparse
import time

import _common
from _common import markdown_table, print_json

import torch  # noqa: E402

import model as models  # noqa: E402  (the project's modules; _common put the repo on sys.path)
import losses  # noqa: E402
from lib import engine, runtime  # noqa: E402
import utils  # noqa: E402

# name -> (amp, channels_last, concat_forward)
BASE_CONFIGS = {
    'fp32 3-forward (original)': ('off', False, False),
    'fp32 concat': ('off', False, True),
    'bf16 3-forward': ('bf16', False, False),
    'bf16 channels_last': ('bf16', True, False),
    'bf16 channels_last concat': ('bf16', True, True),
}
FP16_CONFIGS = {  # CUDA only, with a GradScaler
    'fp16 3-forward': ('fp16', False, False),
    'fp16 channels_last': ('fp16', True, False),
    'fp16 channels_last concat': ('fp16', True, True),
}
COMPILE_SUFFIX = ' +compile'
# name suffix -> torch.compile mode
COMPILE_MODES = {COMPILE_SUFFIX: 'default', ' +reduce-overhead': 'reduce-overhead', ' +max-autotune': 'max-autotune'}


def all_config_names():
    names = list(BASE_CONFIGS) + list(FP16_CONFIGS)
    return names + [n + suffix for suffix in COMPILE_MODES for n in names]


def config_of(name):
    mode = next((m for suffix, m in COMPILE_MODES.items() if name.endswith(suffix)), None)
    base = name[:name.rindex(' +')] if mode else name
    amp, channels_last, concat = {**BASE_CONFIGS, **FP16_CONFIGS}[base]
    return dict(amp=amp, channels_last=channels_last, concat=concat, compile=mode is not None,
                compile_mode=mode)


def skip_reason(cfg, device):
    if cfg['amp'] == 'fp16' and device.type != 'cuda':
        return 'fp16 with GradScaler is benchmarked on CUDA only'
    if cfg['amp'] == 'bf16' and device.type == 'cpu' and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 'this CPU has no native bf16 support (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)'
    if cfg['amp'] == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return 'this GPU does not support bf16'
    return None


def run_config(cfg, args, device):
    """Seconds of args.steps timed training steps (after args.warmup untimed ones)."""
    torch.manual_seed(0)
    net = models.build_model('ASENet', args.n_attributes, args.backbone, args.pretrained, args.dim_embed)
    tnet = models.TripletWrapper(net, concat_forward=cfg['concat']).to(device)
    if cfg['channels_last']:
        tnet = tnet.to(memory_format=torch.channels_last)           # as commands.build_network
    optimizer = runtime.adam([p for p in tnet.parameters() if p.requires_grad], args.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg['amp'] == 'fp16')
    train_model = torch.compile(tnet, mode=cfg['compile_mode']) if cfg['compile'] else tnet
    train_model.train()

    gen = torch.Generator().manual_seed(1)
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    images = [torch.randn(shape, generator=gen).to(device) for _ in range(3)]
    attr = torch.randint(0, args.n_attributes, (args.batch_size,), generator=gen).to(device)

    weights = losses.LossWeights(args.margin)

    def step():
        batch = engine.batch_to_device((*images, attr), device, cfg['channels_last'])
        if cfg['compile']:
            torch.compiler.cudagraph_mark_step_begin()              # as engine.train_one_epoch
        terms, *_ = engine.training_step(train_model, batch, optimizer, scaler, cfg['amp'], weights)
        return terms['triplet']                                                 # read after the timed steps, as asen

    for _ in range(args.warmup):
        step()
    _common.sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _common.sync(device)
    seconds = time.perf_counter() - start
    return seconds, loss.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument('--backbone', default='resnet50', choices=models.BACKBONES)
    parser.add_argument('--pretrained', action='store_true',
                        help='load ImageNet weights (default: random init; speed does not depend on it)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=16, help='triplets per step (3 images each)')
    parser.add_argument('--n-attributes', type=int, default=8)
    parser.add_argument('--dim-embed', type=int, default=1024)
    parser.add_argument('--lr', type=float, default=1e-4)
    parser.add_argument('--margin', type=float, default=0.2)
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per config')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per config')
    parser.add_argument('--device', default=None, choices=('cpu', 'cuda'),
                        help='default: cuda if available')
    parser.add_argument('--compile', action='store_true',
                        help='add a torch.compile (default mode) twin of every config (slow to compile, esp. on CPU)')
    parser.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=None,
                        help='as asen --tf32/--no-tf32 (default: PyTorch\'s setting left as it is)')
    parser.add_argument('--configs', nargs='+', default=None, metavar='NAME',
                        help=f'run only these configs, in this order; names: {all_config_names()}')
    args = parser.parse_args(argv)
    if min(args.steps, args.img_size, args.batch_size) <= 0 or args.warmup < 0:
        parser.error('--steps, --img-size and --batch-size must be positive, --warmup >= 0')

    device = _common.resolve_device(args.device)
    runtime.configure_backends(device, args.tf32)
    info = _common.machine_info(device)
    _common.print_machine(info)

    if args.configs:
        unknown = [n for n in args.configs if n not in all_config_names()]
        if unknown:
            parser.error(f'unknown config(s) {unknown}; choose from {all_config_names()}')
        names = list(args.configs)
        if args.compile:
            names += [n + COMPILE_SUFFIX for n in args.configs if not config_of(n)['compile']
                      and n + COMPILE_SUFFIX not in names]
    else:
        names = list(BASE_CONFIGS) + (list(FP16_CONFIGS) if device.type == 'cuda' else [])
        if args.compile:
            names += [n + COMPILE_SUFFIX for n in names]

    images_per_step = 3 * args.batch_size
    print(f"Training step: {args.backbone} ({'ImageNet' if args.pretrained else 'random'} init), "
          f"{args.img_size} px, {args.batch_size} triplets = {images_per_step} images/step, "
          f"{args.n_attributes} attributes, dim_embed {args.dim_embed}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per config")
    print()
    results, rows, notes, baseline = [], [], [], None
    for name in names:
        cfg = config_of(name)
        reason = skip_reason(cfg, device)
        if reason:
            notes.append(f'skipped {name!r}: {reason}')
            rows.append([name, 'skipped', '', '', ''])
            results.append(dict(name=name, **cfg, skipped=reason))
            continue
        seconds, loss = run_config(cfg, args, device)
        ips = images_per_step * args.steps / seconds
        baseline = baseline or ips
        rows.append([name, f'{ips:.1f}', f'{1000 * seconds / args.steps:.1f}', f'{ips / baseline:.2f}x',
                     f'{loss:.4f}'])
        results.append(dict(name=name, **cfg, images_per_s=ips, step_ms=1000 * seconds / args.steps,
                            speedup=ips / baseline, last_loss=loss))
    print(markdown_table(['config', 'images/s', 'ms/step', 'speed-up', 'last loss'], rows))
    print()
    print('speed-up is relative to the first config that ran.')
    for note in notes:
        print(note)
    if device.type == 'cuda':
        info['max_memory_allocated_gib'] = torch.cuda.max_memory_allocated() / 2**30
    print_json({'benchmark': 'bench_train_step', 'machine': info,
                'settings': {**{k: v for k, v in vars(args).items() if k != 'configs'},
                             'device': str(device)},
                'images_per_step': images_per_step, 'results': results})
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
