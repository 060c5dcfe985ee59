"""
FID, sFID, Inception Score, precision and recall as OpenAI's ADM evaluator computes them, in PyTorch only,
plus a small domain classifier for FID on data far from ImageNet (MNIST, the toy set) and for offline use.
Runs on its own (torch, numpy, pillow, tqdm); data.py is needed only for its dataset specs ('toy', an
MNIST folder, an .npz with 'images') and to train the domain classifier.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --weights pt_inception-2015-12-05-6726825d.pth
    python fid.py real_images/ --save-stats out/real_stats.npz          # a reusable reference
    python fid.py --train-classifier data/mnist --out out/clf_mnist.pt  # MNIST: the IDX files you downloaded
    python fid.py samples.npz data/mnist --features out/clf_mnist.pt

Reading order:
  1. the FID Inception-v3 (TF "2015-12-05" graph as ported by pytorch-fid; same state_dict names), its weights
  2. preprocessing: TF1 bilinear resize to 299 + (x-128)/128 like the ADM graph (default), or pytorch-fid's
  3. image inputs: a folder, an .npz of samples (arr_0 streamed), a stats file, or a data.py dataset spec
  4. metrics: Frechet distance, Inception Score, k-NN precision/recall
  5. evaluate(): the ADM evaluator's pipeline
  6. the domain classifier: training, features, domain_metrics()
  7. the command line
"""

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

try:  # the project's one error convention for bad input; fid.py also runs alone, without common.py
    from common import ArgumentParser, UserError
except ImportError:
    class UserError(Exception):
        """Bad user input or data; main() prints it as one line `error: ...` and exits with 2."""

    class ArgumentParser(argparse.ArgumentParser):
        def error(self, message):  # a bad flag is a UserError too: one line, not argparse's usage block
            raise UserError(f"{message} (see --help)")


def atomic_write(path, write):
    """write(f) to path.tmp, fsync, then rename over path: never a half-written file (common.atomic_write)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_writable(path, flag):
    """A file can be written at path: checked before the work, not after it (as common.check_writable). Creates
    nothing: the nearest folder on the path that exists takes a temporary file."""
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


def set_threads(n=0):
    """torch's CPU threads, the project's policy (cpu_speed.set_threads), applied once at the start of main:
    n if n > 0; else $OMP_NUM_THREADS if set (torch already follows it); else the cores this process may use
    minus the runnable tasks other processes keep busy now (/proc/loadavg field 4, not the 1-minute average;
    the median of 10 looks over ~50 ms), at least 1; without /proc, every core. OpenMP threads that share a
    core with a busy process wait for each other, which slows a small network several times over (measured:
    docs/benchmarks.md, "On a busy machine"). Results are bit-identical from run to run for a fixed count; another
    count trains a slightly different classifier and changes the last digits of a FID (eigh's rounding)."""
    if n <= 0 and os.environ.get('OMP_NUM_THREADS'):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    busy = []
    for _ in range(10 if n <= 0 else 0):
        try:
            with open('/proc/loadavg') as f:
                busy.append(int(f.read().split()[3].split('/')[0]) - 1)  # runnable tasks, this one excluded
        except (OSError, ValueError, IndexError):
            break
        time.sleep(0.005)
    torch.set_num_threads(n if n > 0 else max(1, cores - (sorted(busy)[len(busy) // 2] if busy else 0)))
    return torch.get_num_threads()

# -----------------------------------------------------------------------------
# 1. the FID Inception-v3


FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
# names in the torch hub cache: pytorch-fid's and torch-fidelity's (the same bytes)
FID_WEIGHTS_NAMES = (FID_WEIGHTS_FILE, 'weights-inception-2015-12-05-6726825d.pth')
FID_NUM_KEYS = 472  # 94 conv+BN x 5 tensors + fc.weight + fc.bias, not counting BN's num_batches_tracked


class BasicConv2d(nn.Module):
    """conv (no bias) + BN + ReLU; eps=1e-3 is what the TF graph used."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF's 3x3 average pool divides by the number of real pixels at the border, not by 9
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f'branch7x7dbl_{i}')(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b/7c, 8x8, split 1x3 / 3x1 branches
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # 'avg' in Mixed_7b; the TF graph's Mixed_7c (mixed_10) uses a max pool here
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        p = tf_avg_pool(x) if self.pool == 'avg' else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)


class FIDInception(nn.Module):
    """Inception-v3 of the TF 2015-12-05 graph. Attribute names = keys of
    pt_inception-2015-12-05-6726825d.pth. forward(x in [-1, 1], (N, 3, 299, 299)) -> pool (N, 2048), spatial
    (N, 2023), logits (N, 1008)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, 'avg')
        self.Mixed_7c = InceptionE(2048, 'max')
        self.fc = nn.Linear(2048, 1008)  # the TF graph has 1008 classes (8 unused)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        # sFID uses ADM's 'mixed_6/conv' = Mixed_6d.branch1x1; running it again here (~1% of the FLOPs) keeps
        # the blocks plain
        spatial = self.Mixed_6d.branch1x1(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool = x.mean((2, 3))  # TF pool_3: 8x8 average
        # ADM keeps the first 7 channels and flattens in TF's NHWC order: (N, 17, 17, 7) -> 2023
        spatial = spatial[:, :7].permute(0, 2, 3, 1).flatten(1)
        logits = pool @ self.fc.weight.T  # no bias, as ADM / improved-gan compute the Inception Score
        return pool, spatial, logits


def find_weights(path=None):
    """The weights file: --weights PATH, else the torch hub cache, else one download, its SHA-256 checked."""
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
    howto = (f"get {FID_WEIGHTS_FILE} (95.6 MB, sha256 {FID_WEIGHTS_SHA256[:16]}...) from {FID_WEIGHTS_URL} "
             f"and pass --weights PATH or put it in {hub}/")
    if path:
        if not os.path.isfile(path):
            raise UserError(f"Inception weights not found at {path}; {howto}")
        return path
    for name in FID_WEIGHTS_NAMES:
        if os.path.isfile(os.path.join(hub, name)):
            return os.path.join(hub, name)
    dst = os.path.join(hub, FID_WEIGHTS_FILE)
    try:
        os.makedirs(hub, exist_ok=True)
        # hash_prefix with the full digest checks all of it; a failed download leaves no partial file
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, dst, hash_prefix=FID_WEIGHTS_SHA256, progress=True)
    except Exception as e:
        raise UserError(f"Inception weights not found and the download failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); {howto}") from None
    return dst


def load_inception(path=None, device='cpu'):
    """FIDInception with the pytorch-fid / torch-fidelity weights, checked key by key, in eval mode."""
    path = find_weights(path)
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} as a PyTorch weights file ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not a state_dict; expected {FID_WEIGHTS_FILE}")
    # num_batches_tracked is unused in eval mode and may or may not be in the file
    sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    model = FIDInception()
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    missing, extra = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    shapes = [f"{k} file {tuple(getattr(sd[k], 'shape', ()))} vs model {want[k]}"
              for k in sorted(want.keys() & sd.keys())
              if not torch.is_tensor(sd[k]) or tuple(sd[k].shape) != want[k]]
    if missing or extra or shapes:
        parts = [f"{len(v)} {what} key(s): {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}"
                 for what, v in (('missing', missing), ('unexpected', extra), ('mis-shaped', shapes)) if v]
        raise UserError(f"{path} is not the FID Inception ({FID_WEIGHTS_FILE}): it does not match the model: "
                        + '; '.join(parts))
    model.load_state_dict(sd)  # a plain dict has no BN version metadata, so BN fills in num_batches_tracked
    return model.to(device).eval()

# -----------------------------------------------------------------------------
# 2. preprocessing


def tf_resize_axis(x, dim, size):
    """TF1 ResizeBilinear along one axis (align_corners=False, no half-pixel centres): output pixel j samples
    src = j * in/out, in float32 like TF, and lerps between floor(src) and the next pixel (clamped at the
    edge)."""
    n = x.shape[dim]
    if n == size:
        return x
    scale = torch.tensor(n, dtype=torch.float32, device=x.device) / size  # TF: static_cast<float>(in) / out
    src = torch.arange(size, dtype=torch.float32, device=x.device) * scale
    i0 = src.floor().long()
    w = (src - i0).view([size if d == dim % x.ndim else 1 for d in range(x.ndim)])
    a, b = x.index_select(dim, i0), x.index_select(dim, (i0 + 1).clamp(max=n - 1))
    return a + (b - a) * w


def tf_resize(x, size=(299, 299)):
    """(N, C, H, W) float -> (N, C, *size); TF interpolates along W (x_lerp) first, then H (y_lerp)."""
    return tf_resize_axis(tf_resize_axis(x, 3, size[1]), 2, size[0])


def preprocess(images, resize='tf', device='cpu'):
    """uint8 (N, H, W, 3) -> Inception input (N, 3, 299, 299).
    tf: the ADM graph's own ResizeBilinear on [0, 255], then (x-128)/128 (the graph's Sub 128, Mul 1/128).
    torch: pytorch-fid: [0, 1], F.interpolate bilinear with half-pixel centres, then 2x-1."""
    x = np.require(images, requirements='CW')  # contiguous, writable (PIL, npz-stream arrays are read-only)
    x = torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float()
    if resize == 'tf':
        return (tf_resize(x) - 128) / 128
    if resize == 'torch':
        return 2 * F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1
    raise ValueError(f"resize must be 'tf' or 'torch', not {resize!r}")

# -----------------------------------------------------------------------------
# 3. image inputs


IMG_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.ppm', '.pgm', '.jfif')


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def project_data(why):
    """(load_dataset, to_uint8) of the project's data.py and common.py, imported only where fid.py reads a
    dataset spec or trains the domain classifier."""
    try:
        from common import to_uint8
        from data import load_dataset
    except ImportError as e:
        raise UserError(f"{why} needs data.py and common.py of this project next to fid.py ({e})") from None
    return load_dataset, to_uint8


def to_rgb(img):
    """Any PIL image -> 8-bit RGB, as data.py reads images: 16-bit grey rescaled (PIL's convert would
    clip it), palette and alpha flattened (alpha dropped), grey and CMYK converted."""
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
        a = np.asarray(img).astype(np.float64)
        a = a / 257.0 if img.mode != 'F' and a.max() > 255 else a  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), 'L')
    img = img.convert('RGBA') if img.mode == 'P' else img  # a palette may carry transparency
    return img if img.mode == 'RGB' else img.convert('RGB')


def image_layout(shape, src):
    """'NHWC', 'NCHW' or 'NHW' for the shape of an image batch. Channels last when the last axis is 1, 3 or 4
    (4 = RGBA: alpha is dropped, as for RGBA files); channels first (a torch tensor's layout) only when it is
    not and axis 1 is; anything else (2 channels, a single (H, W, 3) image) is refused."""
    if len(shape) == 3 and shape[-1] not in (3, 4):
        return 'NHW'
    if len(shape) == 4 and shape[-1] in (1, 3, 4):
        return 'NHWC'
    if len(shape) == 4 and shape[1] in (1, 3, 4):
        return 'NCHW'
    raise UserError(f"{src}: an image batch of shape {tuple(shape)} is not supported: expected uint8 "
                    f"(N, H, W, C) or (N, C, H, W) with C = 1 (grey), 3 (RGB) or 4 (RGBA, alpha dropped), "
                    f"or (N, H, W) grey")


def rgb_uint8(a, layout):
    """A uint8 batch in layout -> (B, H, W, 3): grey repeated, alpha dropped."""
    a = a.transpose(0, 2, 3, 1) if layout == 'NCHW' else a[..., None] if layout == 'NHW' else a
    return np.repeat(a, 3, -1) if a.shape[-1] == 1 else a[..., :3]


def nonfinite(a):
    """'' when every value of the numeric array a is finite, else how many are not: '2 NaN, 1 inf of 4096'."""
    a = np.asarray(a)
    if a.dtype.kind not in 'fc' or np.isfinite(a).all():
        return ''
    return f"{np.isnan(a).sum()} NaN, {np.isinf(a).sum()} inf of {a.size}"


def check_uint8(dtype, src):
    if dtype != np.uint8:
        raise UserError(f"{src}: images must be uint8 (0..255), got {dtype}; "
                        f"convert with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")


def npz_keys(path):
    """The array names of an .npz file; None for anything else. An unreadable .npz is a UserError."""
    if not (isinstance(path, str) and path.endswith('.npz') and os.path.isfile(path)):
        return None
    try:
        with np.load(path) as z:
            return z.files
    except Exception as e:
        raise UserError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from None


def is_dataset_spec(path):
    """Inputs that only data.load_dataset reads: 'toy', an MNIST IDX folder, an .npz with 'images'."""
    if path == 'toy':
        return True
    if os.path.isdir(path):
        return any('idx3-ubyte' in f for f in os.listdir(path))
    keys = npz_keys(path)
    return keys is not None and 'images' in keys and 'arr_0' not in keys


def npy_header(f):
    """The .npy header of an open file: (shape, fortran_order, dtype); f is left at the first data byte."""
    version = np.lib.format.read_magic(f)
    fmt = np.lib.format
    return (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)


class Images:
    """uint8 RGB images from a folder (sorted, recursive; a first-level sub-folder is the class), an .npz
    whose 'arr_0' is a uint8 batch NHWC, NCHW or NHW (read in batches, never all at once: 50k 256 px images
    are 9.8 GB), or such an array. .size: the first image's height. .labels: int array ('labels' or 'arr_1' of
    the .npz), sub-folder names (folders), or None. Folder files PIL cannot open are skipped with one warning
    line, images that fail to decode later with one line each; .labels then leaves them out (read it after
    iterating)."""

    def __init__(self, src, labels=None, workers=4):
        src = src if isinstance(src, np.ndarray) else os.fspath(src)
        self.src, self._labels, self.workers, self.dropped = src, labels, workers, set()
        if isinstance(src, np.ndarray):
            check_uint8(src.dtype, 'images')
            self.layout, shape = image_layout(src.shape, 'images'), src.shape
        elif os.path.isdir(src):
            self.scan_folder(src)
        elif npz_keys(src) is not None:
            try:
                with np.load(src) as z:
                    if 'arr_0' not in z.files:
                        raise UserError(f"{src} has no 'arr_0' image array (found {', '.join(z.files)})")
                    for k in ('labels', 'arr_1'):
                        if k in z.files and z[k].ndim == 1:
                            self._labels = z[k].astype(np.int64)
                            break
                with zipfile.ZipFile(src) as zf, zf.open('arr_0.npy') as f:
                    shape, _, dtype = npy_header(f)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"cannot read arr_0 of {src} ({type(e).__name__}: {e})") from None
            check_uint8(dtype, f"{src}: arr_0")
            self.layout = image_layout(shape, f"{src}: arr_0")
        elif not os.path.exists(src):
            raise UserError(f"{src} not found")
        else:
            raise UserError(f"cannot read {src}: expected a folder of images, an .npz with arr_0 or stats")
        if not hasattr(self, 'files'):
            self.n, self.size = shape[0], (shape[2] if self.layout == 'NCHW' else shape[1])
        if self.n < 2:
            raise UserError(f"{src}: need at least 2 images, found {self.n}")
        if self._labels is not None and len(self._labels) != self.n:
            raise UserError(f"{src}: {self.n} images but {len(self._labels)} labels")

    def scan_folder(self, src):
        files = []
        for d, dirs, names in os.walk(src):
            dirs[:] = sorted(x for x in dirs if x[0] != '.')
            files += [os.path.join(d, f) for f in sorted(names)
                      if f.lower().endswith(IMG_EXTS) and f[0] != '.']

        def height(f):  # the header only: cheap, and it finds files PIL cannot identify at all
            try:
                with Image.open(f) as im:
                    return im.size[1]
            except Exception:
                return None
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            heights = list(pool.map(height, files))
        bad = [f for f, h in zip(files, heights) if h is None]
        if bad:
            warn(f"skipped {len(bad)} unreadable image file(s) under {src} (first: {bad[0]})")
        self.files = [f for f, h in zip(files, heights) if h is not None]
        if not self.files:
            raise UserError(f"no readable images ({', '.join(IMG_EXTS)}) under {src}")
        self.n, self.size = len(self.files), next(h for h in heights if h is not None)
        parts = [os.path.relpath(f, src).split(os.sep) for f in self.files]
        if all(len(p) > 1 for p in parts):
            self._labels = [p[0] for p in parts]

    @property
    def labels(self):
        if self._labels is None or not self.dropped:
            return self._labels
        keep = [i for i in range(len(self._labels)) if i not in self.dropped]
        return [self._labels[i] for i in keep] if isinstance(self._labels, list) else self._labels[keep]

    def batches(self, batch_size):
        """uint8 (B, H, W, 3) arrays; a folder of mixed sizes gives lists of (H, W, 3) arrays instead."""
        if isinstance(self.src, np.ndarray):
            for i in range(0, self.n, batch_size):
                yield rgb_uint8(self.src[i:i + batch_size], self.layout)
        elif hasattr(self, 'files'):
            def read(f):
                try:
                    with Image.open(f) as im:
                        return np.asarray(to_rgb(im))
                except Exception as e:  # e.g. a truncated file whose header was fine
                    return e
            with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:  # PIL decodes without the GIL
                for i in range(0, self.n, batch_size):
                    ims = []
                    for j, a in enumerate(pool.map(read, self.files[i:i + batch_size]), i):
                        if isinstance(a, Exception):
                            if j not in self.dropped:
                                warn(f"skipped unreadable image {self.files[j]} ({type(a).__name__}: {a})")
                            self.dropped.add(j)
                        else:
                            ims.append(a)
                    if ims:
                        yield np.stack(ims) if len({a.shape for a in ims}) == 1 else ims
        else:
            yield from self.npz_batches(batch_size)

    def npz_batches(self, batch_size):
        with zipfile.ZipFile(self.src) as zf, zf.open('arr_0.npy') as f:  # savez and savez_compressed alike
            shape, fortran, _ = npy_header(f)
            if fortran:  # rare; column-major data cannot be streamed row by row
                yield from Images(np.load(self.src)['arr_0']).batches(batch_size)
                return
            per = int(np.prod(shape[1:]))
            for i in range(0, self.n, batch_size):
                m = min(batch_size, self.n - i)
                try:
                    buf = f.read(m * per)
                except (zipfile.BadZipFile, OSError, EOFError) as e:  # a damaged archive: CRC or zlib error
                    raise UserError(f"{self.src}: arr_0 is damaged after {i} of {self.n} images ({e})") \
                        from None
                if len(buf) < m * per:
                    raise UserError(f"{self.src}: arr_0 is truncated after {i} of {self.n} images")
                a = np.frombuffer(bytearray(buf), np.uint8).reshape((m,) + tuple(shape[1:]))
                yield rgb_uint8(a, self.layout)


def open_images(path, image_size=32, split='train'):
    """Images from any input but a stats file. A dataset spec is loaded by data.py at image_size and
    turned back into uint8 (its [-1, 1] floats come from uint8, so this is exact)."""
    if not is_dataset_spec(path):
        return Images(path)
    load_dataset, to_uint8 = project_data(f"reading the dataset {path!r}")
    ds = load_dataset(path, image_size, split=split)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return Images(to_uint8(torch.stack(xs)), labels=np.array(ys, np.int64))


STAT_KEYS = ('mu', 'sigma', 'mu_s', 'sigma_s', 'acts')  # a stats file's arrays (acts: pool features, for P/R)


def save_stats(path, tag, side):
    """np.savez (atomic) of the statistics + a 'features' tag: stats of different feature spaces never mix."""
    arrays = {k: side[k] for k in STAT_KEYS if k in side}
    atomic_write(path, lambda f: np.savez(f, features=np.array(tag), **arrays))


def load_stats(path, tag):
    """Arrays of a stats file (ours, ADM's reference batch, or pytorch-fid's), checked: 'mu' with 'sigma',
    'mu_s' with 'sigma_s', shapes that fit. Files without a 'features' tag are Inception statistics."""
    try:
        with np.load(path) as z:
            files, got = z.files, (str(z['features']) if 'features' in z.files else None)
            stats = {k: z[k] for k in STAT_KEYS if k in z.files}
    except Exception as e:
        raise UserError(f"cannot read {path} as a statistics .npz ({type(e).__name__}: {e})") from None
    if (got or 'inception') != tag and not (got is None and tag.startswith('inception')):
        raise UserError(f"{path} holds statistics of '{got or 'inception'}' features, but this run uses "
                        f"'{tag}'")
    for mu, sigma in (('mu', 'sigma'), ('mu_s', 'sigma_s')):
        missing = [k for k in (mu, sigma) if k not in stats]
        if missing and (mu == 'mu' or len(missing) == 1):
            raise UserError(f"{path}: a statistics file needs 'mu' and 'sigma' (optional: 'mu_s' with "
                            f"'sigma_s', 'acts'); missing {', '.join(map(repr, missing))} "
                            f"(found {', '.join(files)})")
        if not missing and stats[sigma].size != stats[mu].size ** 2:
            raise UserError(f"{path}: '{sigma}' of shape {stats[sigma].shape} does not fit '{mu}' of shape "
                            f"{stats[mu].shape}")
    for k, a in stats.items():
        if a.dtype.kind not in 'biuf':
            raise UserError(f"{path}: '{k}' holds {a.dtype} values, not numbers")
        if nonfinite(a):  # else FID would come out nan or inf, or eigh would fail to converge
            hint = "; a covariance of fewer than 2 images is NaN" if k.startswith('sigma') else ""
            raise UserError(f"{path}: '{k}' holds NaN or inf ({nonfinite(a)} values): recompute the "
                            f"statistics{hint}")
    return stats


def open_side(path, role, tag, image_size=None, split='train', want_images=True):
    """One input, checked before any feature is computed (a bad reference fails in seconds, not after the
    samples): (stats or None, Images or None). role 'samples': images (arr_0) whenever the file has them, as
    the ADM evaluator computes IS and the rest from a sample batch's arr_0; a file without images gives its
    stats. role 'ref': stored statistics win (an ADM reference batch's mu/sigma describe the whole data set)
    and its images, when it has them, serve precision/recall only (want_images)."""
    keys = npz_keys(path) or ()
    if any(k in keys for k in ('mu', 'sigma', 'mu_s', 'sigma_s')) and (role == 'ref' or 'arr_0' not in keys):
        stats = load_stats(path, tag)
        return stats, Images(path) if want_images and 'acts' not in stats and 'arr_0' in keys else None
    return None, open_images(path, image_size or 32, split)

# -----------------------------------------------------------------------------
# 4. metrics


def gaussian_stats(acts):
    """Mean and unbiased covariance in float64 (float32 accumulators visibly bias FID); N >= 2 rows (one row's
    unbiased covariance is 0/0 = NaN)."""
    acts = torch.as_tensor(np.asarray(acts), dtype=torch.float64)
    if acts.ndim != 2 or len(acts) < 2:
        raise UserError(f"a covariance needs 2 or more feature vectors, got {len(acts)} of shape "
                        f"{tuple(acts.shape)}")
    return acts.mean(0).numpy(), torch.cov(acts.T).reshape(acts.shape[1], acts.shape[1]).numpy()


def zero_tiny(w):
    """Eigenvalues below rounding level (d * eps * max) -> 0. With N < d samples most eigenvalues are exactly
    0 but come out as +-1e-16-ish; their square roots (1e-8 each, thousands of them) would add up."""
    return torch.where(w > len(w) * torch.finfo(w.dtype).eps * w.abs().max(), w, torch.zeros_like(w))


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2) between two Gaussians, in float64.
    S1 S2 is similar to the symmetric PSD R S2 R with R = S1^1/2, so Tr((S1 S2)^1/2) =
    sum sqrt(eigvalsh(R S2 R)): no scipy sqrtm (deprecated disp, version regressions), no imaginary parts,
    rank-deficient covariances are fine. Identical inputs can give tiny negative values (rounding); they are
    returned as they are. torch rather than numpy linalg: on a busy 2-core machine numpy's threaded eigh
    (d=2048) took 22 s, torch's 3 s."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64)  # 1-d statistics too
                        for a in (mu1, mu2, sigma1, sigma2))
    mu1, mu2, s1, s2 = mu1.reshape(-1), mu2.reshape(-1), torch.atleast_2d(s1), torch.atleast_2d(s2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                        f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    bad = [k for k, a in (('mu1', mu1), ('sigma1', s1), ('mu2', mu2), ('sigma2', s2)) if not a.isfinite().all()]
    if bad:
        raise UserError(f"statistics with NaN or inf values: {', '.join(bad)}")
    w, v = torch.linalg.eigh(s1)
    r = (v * zero_tiny(w).sqrt()) @ v.T
    m = r @ s2 @ r
    tr_covmean = zero_tiny(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    d = mu1 - mu2
    fd = (d @ d + s1.trace() + s2.trace() - 2 * tr_covmean).item()
    if not math.isfinite(fd):  # finite inputs beyond float64's range: |mu|^2 or Tr(sigma) above ~1e308
        raise UserError(f"the Frechet distance came out {fd}: the statistics overflow float64")
    return fd


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per contiguous split of split_size samples (ADM: 5000, last split may be
    smaller, no shuffling); returns (mean, std) over splits. float64 log-softmax: confident classes do not
    underflow."""
    logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), 1)
    scores = []
    for part in logp.split(split_size):
        log_marginal = torch.logsumexp(part, 0) - math.log(len(part))
        scores.append(math.exp((part.exp() * (part - log_marginal)).sum(1).mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def sq_dists(a, b):
    """Pairwise squared distances |a|^2 - 2ab + |b|^2 in float32 (ADM uses float16), clamped at 0."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)).clamp_min_(0)


def knn_radii(x, k=3, block=2000):
    """Squared distance from each row to its k-th nearest neighbour in x, itself excluded (column 0)."""
    return torch.cat([sq_dists(xb, x).topk(k + 1, dim=1, largest=False).values[:, k]
                      for xb in x.split(block)])


def coverage(x, centres, radii, block=2000):
    """Fraction of rows of x that fall inside at least one ball (centre, radius)."""
    inside = torch.cat([(sq_dists(xb, centres) <= radii).any(1) for xb in x.split(block)])
    return inside.double().mean().item()


def precision_recall(ref, gen, k=3, block=2000, device='cpu'):
    """Kynkaanniemi et al. 2019 as in ADM: precision = share of samples inside the k-NN manifold of the
    reference, recall = share of reference points inside the k-NN manifold of the samples. block bounds
    memory (block x N)."""
    ref, gen = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device) for a in (ref, gen))
    precision = coverage(gen, ref, knn_radii(ref, k, block), block)
    recall = coverage(ref, gen, knn_radii(gen, k, block), block)
    return precision, recall

# -----------------------------------------------------------------------------
# 5. evaluate(): the ADM pipeline

# output lines in ADM's wording, in its order, then the domain metrics
LABELS = {'is': 'Inception Score', 'fid': 'FID', 'sfid': 'sFID', 'precision': 'Precision', 'recall': 'Recall',
          'acc': 'Accuracy', 'ref_acc': 'Reference accuracy'}


@contextlib.contextmanager
def exact_fp32(device):
    """Features in true fp32: no TF32 (SAR's sampler turns it on globally), no autocast; restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode(), torch.autocast(torch.device(device).type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def inception_features(model, images, batch_size=64, resize='tf', device='cpu', desc='features'):
    """Images -> float32 numpy (pool (N, 2048), spatial (N, 2023), logits (N, 1008))."""
    outs = []
    with exact_fp32(device), tqdm(total=images.n, desc=desc, unit='img', file=sys.stderr) as bar:
        for b in images.batches(batch_size):
            # mixed sizes: each image is resized to 299 on its own, as the TF graph does
            x = preprocess(b, resize, device) if isinstance(b, np.ndarray) else \
                torch.cat([preprocess(a[None], resize, device) for a in b])
            outs.append([t.float().cpu().numpy() for t in model(x)])
            bar.update(len(x))
    feats = [np.concatenate(o) for o in zip(*outs)] or [np.zeros((0, 1))] * 3
    if len(feats[0]) < 2:
        raise UserError(f"{desc}: only {len(feats[0])} of {images.n} images could be decoded; need 2 or more")
    for name, f in zip(('pool', 'spatial', 'logits'), feats):
        if nonfinite(f):
            raise UserError(f"{desc}: the Inception {name} features are not finite ({nonfinite(f)} values): "
                            f"are the weights the FID Inception's, without NaN or inf?")
    return feats


def note(msg):
    print(f"note: {msg}", file=sys.stderr)


def finite_results(out):
    """out, after checking that every metric in it is a finite number: a NaN or inf is never reported as a
    result. The inputs are checked first (stats files, features), so this is the last line of defence."""
    bad = [f"{LABELS.get(k, k)} = {v}" for k, v in out.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise UserError(f"non-finite result(s): {', '.join(bad)}: a numerical failure, not a score")
    return out


def image_side(path, feats):
    """What one input's images give the metrics: mu/sigma, mu_s/sigma_s, acts (pool, for P/R), logits, n."""
    pool, spatial, logits = feats
    if len(pool) < 2048:
        note(f"{path}: {len(pool)} images < 2048 features: the covariance is rank-deficient and FID is "
             f"biased upwards")
    (mu, sigma), (mu_s, sigma_s) = gaussian_stats(pool), gaussian_stats(spatial)
    return dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, acts=pool, logits=logits, n=len(pool))


def evaluate(samples, ref=None, weights=None, device='cpu', batch_size=64, resize='tf',
             metrics=('is', 'fid', 'sfid', 'pr'), save_stats_path=None, ref_split='train', model=None,
             pr_block=2000):
    """The ADM evaluator: Inception Score of the samples, FID / sFID against the reference (its stored
    mu/sigma when it has them), precision/recall against the reference images. Returns a dict; skipped metrics
    are left out. save_stats_path gets the reference's statistics (the samples' when ref is None); a
    dataset-spec reference ('toy', MNIST) is read at the samples' resolution. The Inception weights are loaded
    only when an input is images: two statistics files give FID (and sFID, precision/recall when both hold
    what those need) without them."""
    need, tag = set(metrics), f'inception-{resize}'
    s_stats, s_images = open_side(samples, 'samples', tag)
    r_stats = r_images = None
    if ref:
        pr_possible = 'pr' in need and (s_images is not None or 'acts' in s_stats)
        r_stats, r_images = open_side(ref, 'ref', tag, s_images and s_images.size, ref_split, pr_possible)
    net = [model]

    def features(images, path):
        if net[0] is None:
            net[0] = load_inception(weights, device)
        return inception_features(net[0], images, batch_size, resize, device, os.path.basename(str(path)))
    s = s_stats if s_stats is not None else image_side(samples, features(s_images, samples))
    r = r_stats if r_stats is not None or not ref else image_side(ref, features(r_images, ref))
    if r_stats is not None and r_images is not None:  # ADM reference batch: its 10k images serve P/R only
        r['acts'] = features(r_images, ref)[0]
    if save_stats_path:
        save_stats(save_stats_path, tag, r or s)
    out = dict(n_samples=s.get('n'), n_ref=r and r.get('n'), resize=resize)
    if 'is' in need:
        if 'logits' in s:
            out['is'], out['is_std'] = inception_score(s['logits'])
        else:
            note("Inception Score skipped: the samples are statistics, not images")
    if r is None:
        return finite_results(out)
    for name, mu, sigma in (('fid', 'mu', 'sigma'), ('sfid', 'mu_s', 'sigma_s')):
        if name in need:
            if all(k in d for d in (s, r) for k in (mu, sigma)):
                out[name] = frechet_distance(s[mu], s[sigma], r[mu], r[sigma])
            else:
                note(f"{LABELS[name]} skipped: an input is statistics without {mu}/{sigma}")
    if 'pr' in need:
        if 'acts' not in s or 'acts' not in r:
            note("Precision/Recall skipped: they need images (or saved 'acts') on both sides")
        elif min(len(s['acts']), len(r['acts'])) < 4:
            note("Precision/Recall skipped: the 3rd-nearest-neighbour radii need at least 4 images per side")
        else:
            out['precision'], out['recall'] = precision_recall(r['acts'], s['acts'], block=pr_block,
                                                               device=device)
    return finite_results(out)

# -----------------------------------------------------------------------------
# 6. the domain classifier: FID in the features of a small CNN trained on the data itself


class DomainCNN(nn.Module):
    """Four 3x3 conv layers, a max pool after each of the first three, a global average pool -> penultimate
    features (4 * width = 64-d: the FID space) -> linear classifier. ~60k parameters at width 16."""

    def __init__(self, num_classes, image_size=32, width=16):
        super().__init__()
        self.image_size = image_size

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        w = width
        self.body = nn.Sequential(*conv(3, w), nn.MaxPool2d(2), *conv(w, 2 * w), nn.MaxPool2d(2),
                                  *conv(2 * w, 4 * w), nn.MaxPool2d(2), *conv(4 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def resize_center_crop(img, size):
    """Shorter side to size (PIL bicubic, antialiased), then the centre size x size: data.py's
    image-folder resize, so samples and reference data are resized alike."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.resize((nw, nh), Image.BICUBIC).crop((left, top, left + size, top + size))


def to_unit(images, size):
    """uint8 (B, H, W, 3) array (or list of them) -> float (B, 3, size, size) in [-1, 1]; other sizes are
    resized with resize_center_crop."""
    ims = list(images)
    if any(a.shape[:2] != (size, size) for a in ims):
        ims = [np.asarray(resize_center_crop(Image.fromarray(a), size)) for a in ims]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of (B, C, H, W) with a 7-tap kernel (radius 3), edges replicated."""
    r = torch.arange(-3, 4, dtype=x.dtype, device=x.device)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k, c = k / k.sum(), x.shape[1]
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode='replicate'), k.view(1, 1, 1, 7).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode='replicate'), k.view(1, 1, 7, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x, gen):
    """A random shift of up to 2 px and, for half the batches, a blur of sigma 0.3-1.2 px. Class predictions
    then hold for slightly soft samples (accuracy should measure the class, not the sharpness), while FID in
    the features still sees blur. MNIST, seed 1: accuracy on blurred digits 29% -> 96%, FID(blurred) /
    FID(real) 353x -> 151x."""
    dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
    x = torch.roll(x, (dy, dx), (2, 3))
    if torch.rand((), generator=gen) < 0.5:
        x = gaussian_blur(x, torch.empty(()).uniform_(0.3, 1.2, generator=gen).item())
    return x


def train_classifier(data, out, image_size=32, steps=600, batch_size=64, lr=3e-3, width=16, seed=0,
                     device='cpu'):
    """Train DomainCNN on a data.py dataset (its train split), report held-out accuracy, save to out."""
    t0 = time.time()
    torch.manual_seed(seed)
    sets, (load_dataset, _) = {}, project_data("--train-classifier (it reads data.py's datasets)")
    for split, limit in (('train', steps * batch_size), ('val', None)):
        ds = load_dataset(data, image_size, split=split)
        # small data sets, held in memory and decoded once; never more training images than the steps will
        # draw (a short run on 'toy' would otherwise render all 20,000)
        idx = np.random.default_rng(seed).permutation(len(ds))[:limit] if limit and limit < len(ds) \
            else range(len(ds))
        xs, ys = zip(*(ds[i] for i in idx))
        sets[split] = torch.stack(xs).to(device), torch.tensor(ys, device=device)
    (x, y), num_classes, class_names = sets['train'], ds.num_classes, list(ds.class_names)
    model = DomainCNN(num_classes, image_size, width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in (bar := tqdm(range(steps), desc='classifier', file=sys.stderr)):
        for g in opt.param_groups:  # cosine decay to 0: fast start, no tuning of the epoch count
            g['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(x), (batch_size,), generator=gen).to(device)
        loss = F.cross_entropy(model(augment(x[idx], gen))[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f'{loss.item():.3f}')
    model.eval()
    acc = accuracy(model, *sets['val'])
    ckpt = dict(model=model.state_dict(), num_classes=num_classes, image_size=image_size, width=width,
                class_names=class_names, data=str(data), val_acc=acc, steps=steps)
    atomic_write(out, lambda f: torch.save(ckpt, f))
    print(f"classifier: held-out accuracy {acc:.4f} on {len(sets['val'][1])} images, "
          f"{time.time() - t0:.1f}s, saved {out}")
    return acc


@torch.inference_mode()
def accuracy(model, x, y, batch_size=500):
    pred = torch.cat([model(xb)[1].argmax(1) for xb in x.split(batch_size)])
    return (pred == y).double().mean().item()


def load_classifier(path, device='cpu'):
    if not os.path.isfile(path):
        raise UserError(f"classifier not found: {path}; train one with "
                        f"python fid.py --train-classifier DATA --out {path}")
    try:  # tensors and plain containers only: a classifier checkpoint never needs arbitrary unpickling
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} as a classifier checkpoint ({type(e).__name__})") from None
    keys = {'model', 'num_classes', 'image_size', 'width', 'class_names'}
    if not isinstance(ck, dict) or not keys <= set(ck):
        raise UserError(f"{path} is not a classifier saved by python fid.py --train-classifier")
    model = DomainCNN(ck['num_classes'], ck['image_size'], ck['width'])
    try:
        model.load_state_dict(ck['model'])
    except RuntimeError as e:
        raise UserError(f"{path}: the classifier weights do not match DomainCNN "
                        f"({str(e).splitlines()[0]})") from None
    with open(path, 'rb') as f:  # stats saved with one classifier must never be compared with another's
        tag = 'domain-' + hashlib.sha256(f.read()).hexdigest()[:16]
    return model.to(device).eval(), ck['class_names'], tag


def class_ids(labels, class_names):
    """Labels as class indices: ints stay; per-class folder names map through the classifier's class names
    (or are read as integers, e.g. folders '0'..'9'). None when they cannot be resolved."""
    if labels is None or isinstance(labels, np.ndarray):
        return labels
    ids = [class_names.index(n) if n in class_names else int(n) if n.isdigit() else None for n in labels]
    return None if None in ids else np.array(ids, np.int64)


def domain_side(name, stats, images, model, class_names, batch_size=64, device='cpu'):
    """mu/sigma of the classifier's penultimate features, and the accuracy against the labels if any."""
    if stats is not None:
        return stats
    feats, preds = [], []
    with exact_fp32(device):
        for b in images.batches(batch_size):
            f, logits = model(to_unit(b, model.image_size).to(device))
            feats.append(f.double().cpu().numpy())
            preds.append(logits.argmax(1).cpu().numpy())
    if sum(map(len, feats)) < 2:
        raise UserError(f"{name}: fewer than 2 of {images.n} images could be decoded")
    feats, pred = np.concatenate(feats), np.concatenate(preds)
    if nonfinite(feats):
        raise UserError(f"{name}: the classifier's features are not finite ({nonfinite(feats)} values): its "
                        f"weights hold NaN or inf (a diverged training run?)")
    mu, sigma = gaussian_stats(feats)
    side = dict(mu=mu, sigma=sigma, n=len(feats))
    labels = class_ids(images.labels, class_names)  # after reading: images that failed to decode are left out
    if labels is not None:
        side['acc'] = float((pred == labels).mean())
    return side


def domain_metrics(samples, ref=None, clf_path='out/clf.pt', batch_size=64, device='cpu', ref_split='train',
                   save_stats_path=None):
    """FID in the domain classifier's features and the accuracy of samples against the class they were
    generated for (the .npz 'labels' array or per-class folders). Returns dict(fid, acc, ref_acc, n_samples,
    n_ref), leaving out what the inputs cannot give. ref: a dataset spec ('toy', MNIST folder, ...), images,
    or stats saved with this classifier. Samples with images use them, as in evaluate()."""
    model, names, tag = load_classifier(clf_path, device)
    s_in = open_side(samples, 'samples', tag, model.image_size, ref_split)
    r_in = open_side(ref, 'ref', tag, model.image_size, ref_split, want_images=False) if ref else None
    s = domain_side(samples, *s_in, model, names, batch_size, device)
    r = domain_side(ref, *r_in, model, names, batch_size, device) if ref else None
    if save_stats_path:
        save_stats(save_stats_path, tag, r or s)
    out = dict(n_samples=s.get('n'), n_ref=r and r.get('n'), features=tag)
    if 'acc' in s:
        out['acc'] = s['acc']
    if r is not None:
        out['fid'] = frechet_distance(s['mu'], s['sigma'], r['mu'], r['sigma'])
        if 'acc' in r:
            out['ref_acc'] = r['acc']
    return finite_results(out)

# -----------------------------------------------------------------------------
# 7. the command line


def build_parser():
    p = ArgumentParser(
        description="FID / sFID / Inception Score / precision / recall as OpenAI's ADM evaluator computes "
                    "them (PyTorch only), or FID + class accuracy in the features of a small domain "
                    "classifier (--features).",
        epilog="examples:\n"
               "  python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --weights pt_inception.pth\n"
               "  python fid.py real_images/ --save-stats out/real_stats.npz\n"
               "  python fid.py --train-classifier toy --out out/clf_toy.pt\n"
               "  python fid.py samples.npz toy --features out/clf_toy.pt --json out/fid.json\n"
               "  python fid.py --train-classifier data/mnist --out out/clf_mnist.pt  # MNIST IDX files",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('samples', nargs='?',
                   help="generated images: an .npz with arr_0 uint8 NHWC or NCHW (+ optional 'labels'), "
                        "a folder of images (per-class sub-folders give labels), or a stats .npz; alone, "
                        "only the Inception Score (or the accuracy, with --features) is reported")
    p.add_argument('ref', nargs='?',
                   help="reference: an ADM reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0), a stats "
                        ".npz (--save-stats or pytorch-fid), an .npz with arr_0, a folder of images, or a "
                        "dataset spec of data.py ('toy', an MNIST IDX folder, an .npz with 'images'), "
                        "read at the samples' size")
    p.add_argument('--weights', metavar='PATH',
                   help=f"Inception weights ({FID_WEIGHTS_FILE}); default: the torch hub cache, else one "
                        "download with its SHA-256 checked; not needed when both inputs are statistics")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument('--batch-size', type=int, default=64, help="images per forward pass (default 64, as ADM)")
    p.add_argument('--resize', choices=['tf', 'torch'], default='tf',
                   help="tf: TF1 bilinear resize + (x-128)/128 as in the ADM evaluator (default); torch: "
                        "pytorch-fid's F.interpolate + 2x-1")
    p.add_argument('--metrics', default='is,fid,sfid,pr', help="comma list of is,fid,sfid,pr (default: all)")
    p.add_argument('--save-stats', metavar='PATH',
                   help="write the reference's statistics (the samples' when REF is omitted) to PATH (.npz), "
                        "to be passed as REF later")
    p.add_argument('--json', metavar='PATH', help="also write the results as a JSON dict to PATH")
    p.add_argument('--ref-split', default='train', choices=['train', 'val', 'all'],
                   help="split of a dataset-spec REF (default train, like ADM's training-set statistics)")
    p.add_argument('--features', metavar='CLF',
                   help="a classifier from --train-classifier: report FID in its penultimate features and "
                        "the accuracy of samples against their labels, instead of Inception metrics")
    p.add_argument('--train-classifier', metavar='DATA',
                   help="train the domain classifier on DATA ('toy', an MNIST IDX folder, an .npz with "
                        "images + labels, or a folder of class sub-folders); saves to --out")
    p.add_argument('--out', default='out/clf.pt', help="where --train-classifier saves (default out/clf.pt)")
    p.add_argument('--image-size', type=int, default=32,
                   help="classifier input size for --train-classifier (default 32)")
    p.add_argument('--steps', type=int, default=600,
                   help="classifier training steps of 64 images (default 600)")
    p.add_argument('--seed', type=int, default=0, help="classifier training seed (default 0)")
    p.add_argument('--threads', type=int, default=0,
                   help="torch CPU threads (default 0: $OMP_NUM_THREADS if set, else the cores other "
                        "processes leave free at start); results are bit-identical for a fixed count")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.train_classifier and not args.samples:
        p.error("give SAMPLES [REF], or --train-classifier DATA")
    bad = set(args.metrics.split(',')) - {'is', 'fid', 'sfid', 'pr'}
    if bad:
        p.error(f"unknown metrics {sorted(bad)}; choose from is,fid,sfid,pr")
    try:                                    # a device this machine lacks: one line now, not a traceback later
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device; use cpu, cuda, cuda:1 or mps")
    count = {'cpu': 1, 'cuda': torch.cuda.device_count() if torch.cuda.is_available() else 0,
             'mps': int(torch.backends.mps.is_available())}.get(device.type, 0)
    if (device.index or 0) >= count:
        p.error(f"--device {args.device}: not available on this machine ({count} {device.type} device(s))")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        outputs = (('--out', args.out if args.train_classifier else None), ('--json', args.json),
                   ('--save-stats', args.save_stats))
        for flag, path in outputs:          # every output path before any work
            check_writable(path, flag) if path else None
        set_threads(args.threads)
        if args.train_classifier:
            train_classifier(args.train_classifier, args.out, args.image_size, args.steps, seed=args.seed,
                             device=args.device)
            return 0
        if args.features:
            res = domain_metrics(args.samples, args.ref, args.features, args.batch_size, args.device,
                                 args.ref_split, args.save_stats)
        else:
            res = evaluate(args.samples, args.ref, args.weights, args.device, args.batch_size, args.resize,
                           args.metrics.split(','), args.save_stats, args.ref_split)
        for key, label in LABELS.items():
            if key in res:
                print(f"{label}: {res[key]}")
        if args.save_stats:
            print(f"saved statistics to {args.save_stats}")
        if args.json:
            try:
                atomic_write(args.json, lambda f: f.write(json.dumps(res, indent=1).encode()))
            except OSError as e:
                raise UserError(f"cannot write {args.json} ({e.strerror or e})") from None
    except UserError as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
