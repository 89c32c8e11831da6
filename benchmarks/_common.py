"""Helpers shared by the benchmark scripts: repo import path, machine description, output."""
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# torch is imported where it is used: project_recipe.py and gpu_summary.py only read JSON files.


def cpu_model():
    """CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def machine_info(device=None):
    """Dict describing where the benchmark ran."""
    import torch
    info = {
        'cpu': cpu_model(),
        'cpu_count': os.cpu_count(),
        'torch': torch.__version__,
        'torch_threads': torch.get_num_threads(),
        'omp_num_threads': os.environ.get('OMP_NUM_THREADS'),
        'python': platform.python_version(),
    }
    if torch.cuda.is_available():
        info['cuda'] = torch.version.cuda
        info['gpu'] = torch.cuda.get_device_name(0)
    if device is not None:
        info['device'] = str(device)
    return info


def print_machine(info):
    gpu = f", GPU {info['gpu']} (CUDA {info['cuda']})" if 'gpu' in info else ', no CUDA GPU'
    print(f"Machine: {info['cpu']} ({info['cpu_count']} cores){gpu}; torch {info['torch']}, "
          f"{info['torch_threads']} intra-op threads (OMP_NUM_THREADS={info['omp_num_threads']}); "
          f"device used: {info.get('device', 'n/a')}")
    print()


def resolve_device(name):
    import torch
    if name is None:
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: --device cuda but CUDA is not available')
    return torch.device(name)


def sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(result, seconds) of fn(), synchronising CUDA around it."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def markdown_table(headers, rows):
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def print_json(obj):
    print('JSON: ' + json.dumps(obj, sort_keys=True))
