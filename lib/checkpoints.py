"""Checkpoints: snapshots written whole or not at all, model_best, the checks of a loaded file
(`validate`), loading weights with one-line errors, and the conversion of the authors' checkpoints
(Maryeon/asen, Maryeon/asenpp) to our names. The run folder's guard is lib/runfolder.py.

A snapshot is a dict {'epoch', 'state_dict', 'prec', 'best_prec', 'optimizer', 'scheduler', 'scaler',
'args', 'rng'}; the authors' files hold {'epoch', 'state_dict', 'prec'} (ASEN++: {'epoch', 'model',
'mAP'}) in their module names.
"""

import math
import numbers
import os

import torch

import model
import utils
from utils import UserError

from lib.runfolder import SNAPSHOTS, STEP_SNAPSHOT


# ----------------------------------------------------------------------------- snapshots

def snapshot(epoch, tnet, optimizer, scheduler, scaler, prec, best_prec, args):
    """Everything a resumed run needs: weights, optimiser, schedule, scaler, settings and RNGs."""
    return {'epoch': epoch, 'state_dict': tnet.state_dict(), 'prec': prec, 'best_prec': best_prec,
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'scaler': scaler.state_dict(), 'args': args.as_dict(), 'rng': utils.rng_state()}


def save_snapshot(state, run_dir, is_best):
    """checkpoint.pth.tar and, when best, model_best.pth.tar: each written whole or not at all."""
    path = os.path.join(run_dir, 'checkpoint.pth.tar')
    utils.save_atomic(state, path)
    if is_best:
        best = os.path.join(run_dir, 'model_best.pth.tar')
        tmp = best + '.tmp'
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
            # a hard link, not a copy of the file (3 x the weights with Adam's moments): save_atomic
            # replaces checkpoint.pth.tar by a new file, so the best one never changes under its name
            os.link(path, tmp)
            os.replace(tmp, best)
        except OSError:                                     # no hard links here: an atomic, guarded copy
            if os.path.lexists(tmp):
                os.remove(tmp)
            utils.copy_atomic(path, best)


def last_snapshot_note(run_dir):
    """What the user still has when a run stops early."""
    kept = [name for name in SNAPSHOTS if os.path.isfile(os.path.join(run_dir, name))]
    if not kept:
        return 'no snapshot was written yet'
    return f"the last good snapshot {os.path.join(run_dir, kept[0])} is kept"


def weights_are_finite(tnet):
    """Whether every parameter and buffer of `tnet` is finite (one host sync)."""
    tensors = [t for t in (*tnet.parameters(), *tnet.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def restore_training_state(checkpoint, optimizer, scheduler, scaler):
    """Load a snapshot's optimiser, schedule, scaler and RNGs; returns its best_prec (0 for a file
    with weights only)."""
    if checkpoint is None or 'optimizer' not in checkpoint:
        return 0.0
    from lib import runtime
    runtime.load_optimizer_state(optimizer, checkpoint['optimizer'])
    if checkpoint['optimizer'].get('state'):
        # the optimiser has stepped, in the process that saved it: PyTorch's check that the schedule
        # steps after the optimiser only sees this process, and warns ("lr_scheduler.step() before
        # optimizer.step()") when a resumed epoch ends before its first step (a stop at its last)
        optimizer._opt_called = True
    scheduler.load_state_dict(checkpoint['scheduler'])
    scaler.load_state_dict(checkpoint['scaler'])
    utils.set_rng_state(checkpoint['rng'])
    return checkpoint.get('best_prec', 0.0)


# ----------------------------------------------------------------------------- step snapshots

def step_snapshot(epoch, steps_done, meters, pass_rng, streams, tnet, optimizer, scheduler, scaler, best_prec,
                  args):
    """An epoch snapshot of the last finished epoch (epoch - 1: code that knows no step snapshots
    resumes it by training epoch `epoch` again) plus 'step', where epoch `epoch` stands after
    `steps_done` optimizer steps: {'epoch', 'batch': steps_done, 'meters': (world, engine.METER_ROW_WIDTH) float64, every
    rank's running loss and accuracy (engine.meter_row), 'streams': the loader's flip streams,
    'world': the processes}.

    'rng' is the state of the RNGs when the epoch's loader pass began (`pass_rng`), which the
    resumed pass replays to its position (gpuinput.DeviceLoader.start_at); only CUDA's is the state
    now (the loader draws nothing from it). The training step draws no random number on the CPU.
    The epoch's triplets are not stored: set_epoch(epoch) draws them again from (seed, epoch)."""
    state = snapshot(epoch - 1, tnet, optimizer, scheduler, scaler, None, best_prec, args)
    rng = dict(pass_rng)
    if 'cuda' in state['rng']:
        rng['cuda'] = state['rng']['cuda']
    state['rng'] = rng
    state['step'] = {'epoch': epoch, 'batch': steps_done, 'meters': meters, 'streams': streams,
                     'world': int(meters.shape[0])}
    return state


def save_step_snapshot(state, run_dir):
    """runs/<name>/step.pth.tar, written whole or not at all; returns its path."""
    path = os.path.join(run_dir, STEP_SNAPSHOT)
    utils.save_atomic(state, path)
    return path


def remove_step_snapshot(run_dir):
    """Once the epoch's checkpoint.pth.tar is written, the step snapshot before it is stale."""
    path = os.path.join(run_dir, STEP_SNAPSHOT)
    if os.path.isfile(path):
        os.remove(path)


def step_position(checkpoint):
    """A step snapshot's 'step' entry, or None for an epoch snapshot (or no checkpoint)."""
    step = checkpoint.get('step') if isinstance(checkpoint, dict) else None
    return step if isinstance(step, dict) else None


def progress(checkpoint):
    """How far a snapshot is: (epochs finished, steps into the next one)."""
    step = step_position(checkpoint)
    return int(checkpoint.get('epoch') or 0), int(step['batch']) if step else 0


def newest_snapshot(run_dir):
    """(path, loaded snapshot) of the most advanced complete snapshot of runs/<name>/
    (checkpoint.pth.tar or step.pth.tar), or None when there is none. Both are written whole or not
    at all, so any file present is complete; each is checked whole (`validate`) before it is read."""
    found = []
    for name in ('checkpoint.pth.tar', STEP_SNAPSHOT):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            checkpoint = load(path)
            validate(checkpoint, path)
            found.append((progress(checkpoint), path, checkpoint))
    if not found:
        return None
    _, path, checkpoint = max(found, key=lambda item: item[0])
    return path, checkpoint

# ----------------------------------------------------------------------------- checking a loaded file

def validate(checkpoint, path):
    """One line for the first field of a loaded --resume file that the code would read and that is
    not what our snapshots (or the authors' files) hold: its type, range and finiteness. The saved
    settings ('args') are checked with the flags' own rules by config.Draft.freeze."""
    where = f"--resume {path}"
    if not isinstance(checkpoint, dict):
        raise UserError(f"{where}: holds a {type(checkpoint).__name__}, not an ASEN checkpoint (a dict with "
                        f"'state_dict')")
    key = 'state_dict' if 'state_dict' in checkpoint or 'args' in checkpoint else 'model'
    check_weights(checkpoint.get(key), f"{where}: '{key}'")
    check_number(checkpoint, 'epoch', where, whole=True)
    for name in ('prec', 'best_prec', 'mAP'):
        check_number(checkpoint, name, where)
    if 'args' in checkpoint and not (isinstance(checkpoint['args'], dict) and
                                     all(isinstance(k, str) for k in checkpoint['args'])):
        raise UserError(f"{where}: its saved settings 'args' are a {type(checkpoint['args']).__name__}, not a "
                        f"dict of flags; the file is damaged")
    if 'optimizer' in checkpoint:                          # a snapshot: its training state is restored
        check_training_state(checkpoint, where)
    if 'step' in checkpoint:
        check_step_entry(checkpoint, where)


def check_weights(state, what):
    """A dict of named tensors, every floating one finite."""
    if not isinstance(state, dict):         # (an empty dict is named key by key when loaded)
        kind = 'missing' if state is None else f'a {type(state).__name__}'
        raise UserError(f"{what} is {kind}, not a dict of tensors; it is not an ASEN checkpoint")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{what}: entry {name!r} is a {type(value).__name__}, not a tensor; the file is damaged")
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{what}: non-finite weights (NaN or inf) in {name}; the run had diverged when "
                            f"this was saved; use an earlier snapshot")


def check_number(checkpoint, name, where, whole=False):
    """checkpoint[name]: absent, None, or a finite number (a whole one >= 0 for `whole`)."""
    value = checkpoint.get(name)
    if value is None:
        return
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not whole:
        value = value.item()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if whole:
        ok = ok and isinstance(value, numbers.Integral) and value >= 0
    if not ok:
        kind = 'a whole number >= 0' if whole else 'a finite number'
        raise UserError(f"{where}: '{name}' is {value!r}, not {kind}; the file is damaged")


def check_training_state(checkpoint, where):
    """What restore_training_state reads: the optimiser's groups and moments, the schedule, the
    scaler and the RNG states (tried on the generators, then put back)."""
    optimizer = checkpoint.get('optimizer')
    groups = optimizer.get('param_groups') if isinstance(optimizer, dict) else None
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)
            and isinstance(optimizer.get('state'), dict)):
        raise UserError(f"{where}: 'optimizer' is not an optimiser state (param_groups, state); the file is "
                        f"damaged; load its weights alone with --test, or start a new run")
    for group in groups:
        for name in ('lr', 'eps', 'weight_decay'):
            value = group.get(name)
            if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise UserError(f"{where}: the saved optimiser's {name} is {value!r}, not a finite number; "
                                f"the file is damaged")
    for moments in optimizer['state'].values():
        for name, value in (moments.items() if isinstance(moments, dict) else ()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise UserError(f"{where}: the saved optimiser's {name} is not finite; the run had diverged "
                                f"when this was saved; use an earlier snapshot")
    for name in ('scheduler', 'scaler'):
        if not isinstance(checkpoint.get(name), dict):
            raise UserError(f"{where}: '{name}' is a {type(checkpoint.get(name)).__name__}, not a state dict; "
                            f"the file is damaged")
    check_rng(checkpoint.get('rng'), where)


STEP_KEYS = ('epoch', 'batch', 'meters', 'streams', 'world')


def check_step_entry(checkpoint, where):
    """A step snapshot's 'step' entry, whole: the epoch in progress (the one after the snapshot's
    'epoch'), the steps done, the loader streams, the processes and their meter rows ((world, width)
    finite floats, the width lib/engine's). Its sizes against the run's own (steps per epoch, the
    meters' counts, --epochs) are checked once the run is built (preemption.Preemption's
    check_processes and check_epoch_sizes)."""
    from lib import engine                          # engine imports this module
    step = checkpoint['step']
    damaged = "the file is damaged; move it away to continue from the epoch snapshot, or start anew"
    if not isinstance(step, dict) or any(key not in step for key in STEP_KEYS):
        raise UserError(f"{where}: its step entry 'step' is {'a ' + type(step).__name__ if step is not None else 'None'}"
                        f"{'' if not isinstance(step, dict) else ' without ' + ', '.join(k for k in STEP_KEYS if k not in step)}"
                        f", not the position of a step snapshot; {damaged}")
    for key in ('epoch', 'batch', 'streams', 'world'):
        value = step[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise UserError(f"{where}: its step entry's {key} is {value!r}, not a whole number >= 1; {damaged}")
    epoch = checkpoint.get('epoch')
    if isinstance(epoch, int) and step['epoch'] != epoch + 1:
        raise UserError(f"{where}: a step snapshot of epoch {step['epoch']} holds the weights of epoch {epoch} "
                        f"(it must be epoch {epoch + 1}'s); {damaged}")
    meters, width = step['meters'], engine.meter_width()
    if not (isinstance(meters, torch.Tensor) and meters.is_floating_point() and meters.dim() == 2
            and meters.shape[0] == step['world'] and meters.shape[1] in (width, engine.LEGACY_METER_ROW_WIDTH)):
        shape = tuple(meters.shape) if isinstance(meters, torch.Tensor) else type(meters).__name__
        raise UserError(f"{where}: its step entry's meters are {shape}, not ({step['world']}, {width}) floats "
                        f"(a row of {', '.join(engine.METER_FIELDS)} a process); {damaged}")
    if not bool(torch.isfinite(meters).all()):
        raise UserError(f"{where}: its step entry's meters are not finite; {damaged}")


def check_rng(rng, where):
    """The RNG states as utils.rng_state saved them: tried on the generators, which are then restored."""
    before = utils.rng_state()
    try:
        utils.set_rng_state(rng)
    except Exception as err:        # a malformed state fails in random, numpy or torch, each its own way
        raise UserError(f"{where}: its RNG states 'rng' are malformed ({type(err).__name__}); the file is "
                        f"damaged") from err
    finally:
        utils.set_rng_state(before)


# ----------------------------------------------------------------------------- loading weights

def load(path):
    """A checkpoint file, loaded safely (weights_only=True)."""
    return utils.load_checkpoint(path)


def model_name(tnet):
    return tnet.embeddingnet.model_name


def load_weights(tnet, checkpoint, path, dataset=None):
    state = checkpoint.get('state_dict') if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"--resume {path}: no 'state_dict' in the file; it is not an ASEN checkpoint")
    try:
        tnet.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(weights_mismatch(tnet, state, path, dataset) or
                        f"--resume {path}: weights do not fit --model {model_name(tnet)}: "
                        f"{' '.join(str(err).split())[:300]}") from err


def weights_mismatch(tnet, state, path, dataset=None):
    """One line on why `state` does not fit `tnet`: the attribute count, else the key names."""
    here = tnet.embeddingnet.n_attributes
    in_file = attribute_count(state)
    if in_file is not None and in_file != here:
        source = getattr(dataset, 'meta_path', None)
        where = f"--dataset {dataset.dataset} has {here}" + (f" ({source})" if source else '') if dataset else \
            f"this dataset has {here}"
        return (f"--resume {path}: attribute count {in_file} in the file but {where}; "
                f"pass the --dataset it was trained on")
    detail = utils.state_dict_mismatch(tnet.state_dict(), state)
    return detail and (f"--resume {path}: weights do not fit --model {model_name(tnet)} "
                       f"(--backbone, --dim_embed or --model differ from the file's?): {detail}")


def load_stage1_weights(tnet, checkpoint, path, dataset=None):
    """A stage-1 ASENpp checkpoint into a stage-2 network: every key but the local branch's must fit."""
    try:
        result = tnet.load_state_dict(checkpoint['state_dict'], strict=False)
    except RuntimeError as err:                  # shapes differ (strict=False checks only names)
        raise UserError(weights_mismatch(tnet, checkpoint['state_dict'], path, dataset) or
                        f"--resume {path}: does not fit this ASENpp: {' '.join(str(err).split())[:300]}") from err
    local = ('embeddingnet.local_backbone.', 'embeddingnet.local_attn.')
    missing = [k for k in result.missing_keys if not k.startswith(local)]
    if missing or result.unexpected_keys:
        keys = (missing + list(result.unexpected_keys))[:3]
        raise UserError(f"--resume {path}: does not fit the global branch of this ASENpp "
                        f"(--backbone or --dim_embed differ?): {', '.join(keys)}")


def adopt_original(checkpoint, path):
    """A file saved by the authors' code ({'epoch', 'state_dict', 'prec'}, their module names; ASEN++'s
    main.py writes {'epoch', 'model', 'mAP'}): rename its weights to ours in place and return what
    its keys tell of the network ({'model', 'backbone', 'dim_embed', ...}); None for other files."""
    if isinstance(checkpoint, dict) and 'state_dict' not in checkpoint and 'args' not in checkpoint \
            and isinstance(checkpoint.get('model'), dict):
        checkpoint['state_dict'] = checkpoint.pop('model')
        checkpoint.setdefault('prec', checkpoint.get('mAP'))
    state = checkpoint.get('state_dict') if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or 'args' in checkpoint:
        return None
    try:
        converted = convert_original_state_dict(state)
    except UserError as err:
        raise UserError(f"--resume {path}: {err}") from err
    if converted is None:
        return None
    info, checkpoint['state_dict'] = converted
    return info


# ----------------------------------------------------------------------------- the authors' checkpoints

# Keys of the original backbone that our trunk (cut after layer3) does not have: the authors'
# ResNet keeps an unused ImageNet `fc`, and a whole torchvision ResNet (as in CSN) has `layer4`.
ORIGINAL_UNUSED_BACKBONE = ('fc.', 'layer4.')


def _layer_blocks(keys, prefix):
    return {int(k[len(prefix):].split('.')[0]) for k in keys if k.startswith(prefix)}


def infer_backbone(trunk_keys):
    """BACKBONES name of a ResNet state dict's keys (without prefix), from its layer3 blocks."""
    blocks = len(_layer_blocks(trunk_keys, 'layer3.'))
    bottleneck = any(k.startswith('layer3.0.conv3.') for k in trunk_keys)
    name = {(False, 2): 'resnet18', (False, 6): 'resnet34', (True, 6): 'resnet50'}.get((bottleneck, blocks))
    if name is None:
        kind = 'bottleneck' if bottleneck else 'basic'
        raise UserError(f"a ResNet with {blocks} {kind} blocks in layer3 is none of {', '.join(model.BACKBONES)}")
    return name


def convert_original_state_dict(state):
    """A state dict saved by the authors' code (their triplet wrapper) in our names, or None.

    Original layouts (Maryeon/asen, model.py; their backbone is resnet.py's ResNet, which stops
    after layer3 but keeps an ImageNet `fc`):
      ASENet:     embeddingnet.backbonenet.*, embeddingnet.{mask_fc1,mask_fc2,conv1,conv2,fc1,fc2,feature_fc}.*
      ASENet_V2:  embeddingnet.backbonenet.*, embeddingnet.{attr_embedding,attr_transform1,attr_transform2,
                  conv1,img_bn1,fc1,fc2}.* (+ feature_fc in their earlier V2 code)
      CSN:        embeddingnet.embeddingnet.*, embeddingnet.{embed_fc,masks}.*
    A leading `module.` (nn.DataParallel) is removed. Backbone keys under fc./layer4. are dropped;
    every other key is renamed or, when unknown, kept so that loading names it.
    Returns ({'model', 'backbone', 'n_attributes', 'dim_embed'}, converted state) or None when the
    keys are not in an original layout (e.g. our own checkpoints).
    """
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    if any(k.startswith('choices.') for k in state):
        return convert_original_asenpp(state)
    inner = {k[len('embeddingnet.'):]: v for k, v in state.items() if k.startswith('embeddingnet.')}
    if any(k.startswith('backbonenet.') for k in inner):
        if 'attr_embedding.weight' in inner:
            kind = 'ASENet_V2_fc' if 'feature_fc.weight' in inner else 'ASENet_V2'
            names, n_attributes = model.ASENetV2.ORIGINAL_NAMES, inner['attr_embedding.weight'].shape[0]
        elif 'mask_fc1.weight' in inner:
            kind, names, n_attributes = 'ASENet', model.ASENet.ORIGINAL_NAMES, inner['mask_fc1.weight'].shape[1]
        else:
            heads = sorted({k.split('.')[0] for k in inner} - {'backbonenet'})
            raise UserError(f"original-code layout (embeddingnet.backbonenet.*) but its layers "
                            f"{', '.join(heads) or '(none)'} are neither ASENet's (mask_fc1, ...) nor "
                            f"ASENet_V2's (attr_embedding, ...)")
        dim_embed = inner['feature_fc.weight'].shape[0] if 'feature_fc.weight' in inner else None
    elif any(k.startswith('embeddingnet.') for k in inner):
        kind, names = 'ConditionalSimNet', model.ConditionalSimNet.ORIGINAL_NAMES
        n_attributes = inner['masks.weight'].shape[0] if 'masks.weight' in inner else None
        dim_embed = inner['embed_fc.weight'].shape[0] if 'embed_fc.weight' in inner else None
    else:
        return None
    trunk_name = next(orig for orig, ours in names.items() if ours == 'backbone')
    converted, trunk_keys = {}, []
    for key, value in inner.items():
        head, _, rest = key.partition('.')
        if head == trunk_name:
            if rest.startswith(ORIGINAL_UNUSED_BACKBONE):
                continue
            trunk_keys.append(rest)
        converted['embeddingnet.' + (names.get(head, head) + '.' + rest if rest else key)] = value
    for key, value in state.items():          # keys outside embeddingnet.: kept, so loading names them
        if not key.startswith('embeddingnet.'):
            converted[key] = value
    info = dict(model=kind, backbone=infer_backbone(trunk_keys),
                n_attributes=None if n_attributes is None else int(n_attributes),
                dim_embed=None if dim_embed is None else int(dim_embed))
    return info, converted


def convert_original_asenpp(state):
    """The authors' ASEN++ state dict (Maryeon/asenpp, model.py, ASEN: choices.global.{attrnet,
    basenet, attnnet}.* and, after stage 2, choices.local.* whose attrnet is the same embedding) in
    our names; returns (info, converted state) as convert_original_state_dict does, with the
    local trunk and the stage in info."""
    converted, trunk_keys, embeddings = {}, {'global': [], 'local': []}, {}
    for key, value in state.items():
        parts = key.split('.', 3)
        if len(parts) < 4 or parts[0] != 'choices' or parts[1] not in trunk_keys:
            converted[key] = value                                  # kept, so loading names it
            continue
        _, level, module, rest = parts
        names = model.ASENpp.ORIGINAL_NAMES if level == 'global' else model.ASENpp.ORIGINAL_LOCAL_NAMES
        if module == 'attrnet':
            embeddings[level] = value
            rest = rest.split('.', 1)[1] if rest.startswith('attr_embedding.') else rest
            if level == 'local':                                    # the shared embedding, saved twice
                continue
        elif module == 'basenet':
            if rest.startswith(ORIGINAL_UNUSED_BACKBONE):
                continue
            trunk_keys[level].append(rest)
        converted[f'embeddingnet.{names.get(module, module)}.{rest}'] = value
    if 'global' in embeddings and 'local' in embeddings and not torch.equal(embeddings['global'], embeddings['local']):
        raise UserError("the global and local attribute embeddings differ; the authors' ASEN++ shares one")
    if not trunk_keys['global']:
        raise UserError("original ASEN++ layout (choices.*) without the global trunk choices.global.basenet.*")
    embedding = embeddings.get('global')
    fc = state.get('choices.global.attnnet.feature_fc.weight')
    info = dict(model='ASENpp', backbone=infer_backbone(trunk_keys['global']),
                local_backbone=infer_backbone(trunk_keys['local']) if trunk_keys['local'] else None,
                stage=2 if trunk_keys['local'] else 1,
                n_attributes=None if embedding is None else int(embedding.shape[0]),
                dim_embed=None if fc is None else int(fc.shape[0]))
    return info, converted


def attribute_count(state):
    """Number of attributes of an embedding network's state dict in our names (None if unknown)."""
    # a learned attribute embedding first: ASENet_V2's asa.attr_proj reads that embedding, not a one-hot
    for key, dim in (('embeddingnet.attr_embedding.weight', 0), ('embeddingnet.asa.attr_proj.weight', 1),
                     ('embeddingnet.aca.attr_proj.weight', 1), ('embeddingnet.masks.weight', 0)):
        if key in state and hasattr(state[key], 'shape'):
            return int(state[key].shape[dim])
    return None


