"""asen.py under torchrun with rank 1 SIGKILLed in the middle of training, for the elastic-restart
test of tests/test_preemption.py:

    torchrun --nproc_per_node=2 --max-restarts=1 tests/elastic_worker.py AT MARKER ASEN-ARGS...

Rank 1 of torchrun's first attempt (TORCHELASTIC_RESTART_COUNT 0) writes MARKER, then SIGKILLs
itself right after its optimizer step AT (no handler, no `finally`: as when a machine goes away);
torchrun stops rank 0 and starts both again, and those run asen.py untouched.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import asen  # noqa: E402

AT, MARKER = int(sys.argv[1]), sys.argv[2]
steps, adam_step = 0, torch.optim.Adam.step


def step_then_die(self, *args, **kwargs):
    global steps
    result = adam_step(self, *args, **kwargs)
    steps += 1
    if steps == AT:
        with open(MARKER, 'w') as f:
            f.write(f'rank 1 killed after step {AT}\n')
        os.kill(os.getpid(), signal.SIGKILL)
    return result


if os.environ.get('RANK') == '1' and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0':
    torch.optim.Adam.step = step_then_die
sys.exit(asen.main(sys.argv[3:]))
