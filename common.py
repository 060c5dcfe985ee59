"""
Helpers shared by tokenizer.py, sar.py and the experiments: the one error convention, --device, files written
atomically, checkpoints loaded safely, the per-step seeds and batches, scale lists, the learning-rate
schedule, and image grids. fid.py keeps small copies of the few it needs, so that it runs alone.
"""

import argparse
import json
import math
import os
import pickle
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

class UserError(Exception):
    """Bad input from the user or bad data: missing or unreadable files, invalid flags, datasets we cannot
    use. The message says what to do; every script's main() prints it as one line `error: ...` (exit status
    2)."""


def pick_device(name):
    """--device: 'auto' = cuda if there is a GPU, else cpu; a device this machine lacks is a UserError."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:1 or mps") from None
    count = {'cpu': 1, 'cuda': torch.cuda.device_count() if torch.cuda.is_available() else 0,
             'mps': int(torch.backends.mps.is_available())}.get(device.type, 0)
    if (device.index or 0) >= count:
        raise UserError(f"--device {name}: not available on this machine ({count} {device.type} device(s)); "
                        f"use --device auto")
    return device


def step_seed(seed, step, rank=0):
    """All randomness of training step `step` derives from (seed, step, rank): data order, crops and flips,
    and in sar.py the scale list, class dropout, drop-path and SF sampling. The step counter is then the whole
    RNG state, so a resumed run continues exactly."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2 ** 62)


def step_batches(n, global_batch, micro, world, rank, accum, steps, seed):
    """The batch sampler of both training loops: this rank's micro-batches for the steps `steps`, as lists of
    (image index, item seed) read as ds[(i, seed)]. The global batch of step s is a slice of a seeded
    permutation of the data (one per epoch), and rank r takes micro-batches m * world + r; the item seed (its
    crop and flip) depends on the step and the position in the global batch only, so the images are the
    same for any number of processes. Position-addressable: a resumed run needs no sampler state."""
    for step in steps:
        epoch, pos = divmod(step, n // global_batch)
        batch = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[pos * global_batch:]
        for m in range(accum):
            j = (m * world + rank) * micro
            yield [(i, step_seed(~seed, step) + j + k) for k, i in enumerate(batch[j:j + micro].tolist())]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one error convention: a bad flag or value raises UserError, which main()
    prints as one line `error: ...` (exit 2), instead of argparse's usage block."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def error_line(e):
    """The one line main() prints for a UserError, also for one raised inside a DataLoader worker process: the
    DataLoader re-raises it in the main process with the worker's traceback appended to the message."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith('Caught '):
        return lines[-1].split('UserError: ', 1)[-1]
    return lines[0] if lines else type(e).__name__


_WARNED = set()


def warn_once(msg):
    """Print `warning: msg` to stderr, once per process for the same message (e.g. the same folder scanned for
    the train and the val split)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(f"warning: {msg}", file=sys.stderr)


def atomic_write(path, write):
    """Call write(f) on path.tmp (same directory), fsync, then rename over path: readers see the old file or
    the complete new one, never a half-written one. The temporary file is removed if write fails."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic when source and target are on the same filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path):
    """torch.save that never leaves a half-written file (see atomic_write); creates the parent directory."""
    atomic_write(path, lambda f: torch.save(obj, f))


def check_writable(path, flag='--out'):
    """Make sure a file can be written at path before a long run, not after it. Creates nothing: probes the
    nearest folder on the path that exists (atomic_write creates the missing ones when it saves)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file path")
    d = os.path.dirname(path)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UserError(f"{flag} {path} cannot be written: {d} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: {e.strerror or e}") from None


def load_checkpoint(path, trust=False):
    """Load a checkpoint on CPU. By default only tensors and plain containers are unpickled
    (weights_only=True); a file that needs arbitrary unpickling is refused unless trust=True (only for files
    you trust). Raises UserError for a missing file, a file that is no checkpoint, and a refused one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust)
    except pickle.UnpicklingError as e:  # what torch raises for anything outside the weights_only allow-list
        msg = str(e)
        if 'Unsupported operand' in msg:     # bytes that are no pickle at all: damaged, not untrusted
            raise UserError(f"{path} is not a checkpoint torch can read (damaged or not a torch file: "
                            f"{msg[msg.index('Unsupported operand'):].splitlines()[0]})") from None
        if not trust and ('Unsupported global' in msg or 'Weights only load failed' in msg):
            detail = 'objects outside the weights-only allow-list'
            if 'Unsupported global' in msg:
                detail = msg[msg.index('Unsupported global'):].split(' was not')[0]
            raise UserError(f"{path} needs arbitrary unpickling ({detail}); if you trust this file, "
                            f"pass --trust-checkpoint") from None
        raise UserError(f"{path} is not a checkpoint torch can read ({msg.splitlines()[0][:200]})") from None
    except Exception as e:  # a text file, a truncated download, a non-torch zip ...
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a checkpoint torch can read ({type(e).__name__}: {first})") from None


def load_state_dict_strict(model, sd, what):
    """model.load_state_dict(sd, strict=True), or a UserError naming what did not fit: up to 8 keys of each
    kind (missing from sd, unexpected in sd, shaped differently), so a wrong config or file is easy to spot.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [f"{k} file {tuple(getattr(sd[k], 'shape', ()))} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(getattr(sd[k], 'shape', ())) != tuple(own[k].shape)]
    if missing or unexpected or shaped:
        kinds = (('missing', missing), ('unexpected', unexpected), ('mis-shaped', shaped))
        parts = [f"{len(keys)} {kind} key(s): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for kind, keys in kinds if keys]
        raise UserError(f"{what} does not match the model: " + '; '.join(parts))
    model.load_state_dict(sd, strict=True)


def to_uint8(images):
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8 numpy. The one rounding rule of the project (that
    of torchvision's save_image): floor((clamp(x, -1, 1) + 1) * 127.5 + 0.5), so samples saved by any script
    and the images fid.py reads agree to the last bit."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 + 0.5).floor().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(images, path, nrow):
    """Save (N, 3, H, W) images in [-1, 1] as one PNG grid with nrow images per row (2 px white gap),
    atomically."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    nrow = max(1, min(nrow, n))
    ncol_rows = math.ceil(n / nrow)
    pad = 2
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top: top + h, left: left + w] = arr[i]
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format='PNG'))


def parse_ints(text, what):
    """'1,2,3' (commas, underscores or spaces between) -> [1, 2, 3], all positive; else a UserError naming
    `what`."""
    parts = str(text).replace('_', ',').replace(' ', ',').split(',')
    try:
        v = [int(t) for t in parts if t]
    except ValueError:
        raise UserError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not v or min(v) < 1:
        raise UserError(f"{what} must be comma-separated positive integers, got {text!r}")
    return v


def parse_scales(text, what='--scales'):
    """A scale list (token-map sides): at least two positive integers, strictly increasing, e.g. 1,2,3,4,6,8.
    """
    scales = parse_ints(text, what)
    if len(scales) < 2:
        raise UserError(f"{what} needs at least two scales, got {text!r}")
    if any(b <= a for a, b in zip(scales, scales[1:])):
        raise UserError(f"{what} must be strictly increasing, got {text!r}")
    return scales


def check_scales(scales, latent):
    """The finest token map is area-pooled from the latent, so it cannot be larger than the latent."""
    if scales[-1] > latent:
        raise UserError(f"scale list {list(scales)} goes beyond the tokenizer's {latent}x{latent} latent; "
                        f"the finest scale must be <= {latent}")


def lr_at(step, total, peak, warmup, end_frac, hold_frac):
    """The official 'lin0' schedule: linear warm-up from 0.5% of peak over `warmup` steps, hold the peak for
    hold_frac of the rest, then linear decay to end_frac * peak at the last step."""
    if step < warmup:
        return peak * (0.005 + 0.995 * step / warmup)
    rest = max(1, total - warmup)
    t = (step - warmup) / rest
    if t <= hold_frac:
        return peak
    return peak * (1 - (1 - end_frac) * min(1.0, (t - hold_frac) / max(1e-8, 1 - hold_frac)))


def trim_log(path, step):
    """Keep the records of log.jsonl up to `step` (a resumed run does the later ones again; a new
    run in the same folder starts at 0); a line cut short by a kill is dropped."""
    if not os.path.isfile(path):
        return
    keep = []
    for line in open(path, encoding='utf-8', errors='replace'):
        try:
            keep += [line] if json.loads(line)['step'] <= step else []
        except (ValueError, KeyError, TypeError):
            pass
    atomic_write(path, lambda f: f.write(''.join(keep).encode()))


def check_ranges(args, ranges):
    """Refuse a numeric flag outside its range (or NaN/inf) in one line naming it and the range.
    ranges: {dest: (the rule in words, predicate)}; a value of None (not given) passes."""
    for name, (rule, ok) in ranges.items():
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and ok(v)):
            raise UserError(f"--{name.replace('_', '-')} {v} is out of range: it must be {rule} (see --help)")


def check_unused(given, parser, unread, what):
    """Flags among `unread` that were given (differ from the parser's defaults) would be silently
    ignored by this command: an error that names them instead."""
    unused = [k for k in unread if given[k] != parser.get_default(k)]
    if unused:
        flags = ', '.join('--' + k.replace('_', '-') for k in unused)
        raise UserError(f"{what} {flags}: drop {'it' if len(unused) == 1 else 'them'}")
