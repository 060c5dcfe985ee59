"""
The FlexVAE tokenizer (LlamaGen-style VQ-16 with an L2-normalised codebook) used by FlexVAR / SAR, its
training and evaluation, the image-data readers, and the few helpers that sar.py and fid.py share with it.

Reading order:
  1. the VQ-VAE: encoder, quant_conv, codebook, post_quant_conv, decoder, with the official state_dict names
     so the released FlexVAE.pth loads with strict=True; multi-scale tokenization (VQVAE.tokenize) and
     load_tokenizer. The teacher-forcing input built from the token maps lives in sar.py (sar.tf_input).
  2. training from scratch (python tokenizer.py --data toy) and the per-scale PSNR evaluation
  3. image data: load_dataset ('toy' | .npz | MNIST IDX folder | ImageFolder), the centre crop and the
     official random crop; every dataset accepts ds[i] and ds[(i, seed)] (the seed fixes that item's
     random crop and flip)
  4. helpers the three scripts share: UserError, atomic writes, checkpoint loading, strict state_dict loading,
     image rounding and grids, parsing of integer / scale lists, the learning-rate schedule, CPU threads and
     the fp32 CPU Linear (oneDNN)
  5. the command line (get_parser, main)

Images are float tensors in [-1, 1], shape (B, 3, H, W). A "scale" pn is the side of a pn x pn token map.

Training recipe (part 2; the official FlexVAE was trained elsewhere, these choices are ours, measured on
'toy'):
  - loss = MSE(decode(quantized latent), image) + codebook loss + 0.25 * commitment loss (LlamaGen terms; no
    perceptual/GAN loss, we have no pretrained networks). MSE because PSNR is what we report.
  - first --ae-warmup steps without quantization (decode the L2-normalised latent), then the codebook is set
    by spherical k-means on encoder outputs; afterwards codes unused for 50 steps are restarted on encoder
    outputs.
  - multi-scale: each step also decodes the latent area-downsampled to one random coarser scale, quantized,
    and compares it with the image area-downsampled to the decoded size, so every scale's token map decodes to
    a sensible (smaller) image. That loss trains the decoder only (see train()).
  - learning rate: the 'lin0' schedule sar.py uses (lr_at): warm-up over 5% of the steps, then linear decay to
    10% of the peak.
"""

import argparse
import ctypes
import gzip
import itertools
import math
import operator
import os
import pickle
import platform
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# 1. the VQ-VAE (LlamaGen VQ-16 layout; attribute names are the official state_dict keys)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that also accepts a group holding a single value. torch refuses that case ("expected more
    than 1 value per channel"), which tiny configs (<= 32 channels: one channel per group) hit when they
    decode a single 1x1 token map, e.g. the held-out PSNR of a one-image split. A one-value group normalises
    to 0 (x minus its own mean), so the output there is the bias: the same answer, without the refusal."""

    def forward(self, x):
        if x.shape[0] * (self.num_channels // self.num_groups) * x[0, 0].numel() == 1:
            return torch.zeros_like(x) + self.bias.view(1, -1, 1, 1)
        return super().forward(x)


def Norm(c):
    # GroupNorm(32, eps 1e-6) as in the official code; only widths not divisible by 32 (tiny configs) get
    # fewer groups
    return GroupNorm(math.gcd(32, c), c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, dropout=0.0):
        super().__init__()
        self.norm1 = Norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = Norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)  # 1x1 projection only where the width changes

    def forward(self, x):  # (B, cin, h, w) -> (B, cout, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convs for q/k/v/out, residual."""

    def __init__(self, c):
        super().__init__()
        self.norm = Norm(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, h, w = x.shape
        n = self.norm(x)
        # q, k, v: (B, 1, hw, C)
        q, k, v = (m(n).reshape(B, 1, C, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(o.transpose(2, 3).reshape(B, C, h, w))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):  # asymmetric pad (right/bottom) then stride-2 conv: (h, w) -> (h/2, w/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):  # nearest x2 then 3x3 conv
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class Level(nn.Module):
    """One resolution level: res blocks (each optionally followed by attention) and an optional resampler. The
    resampler attribute is called 'downsample' in the encoder and 'upsample' in the decoder (state_dict
    names)."""

    def __init__(self, cin, cout, n_res, attn, dropout):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, dropout) for i in range(n_res)])
        self.attn = nn.ModuleList([AttnBlock(cout) for _ in range(n_res)] if attn else [])

    def forward(self, h):
        for i, r in enumerate(self.res):
            h = r(h)
            if len(self.attn):
                h = self.attn[i](h)
        for name in ('downsample', 'upsample'):
            if hasattr(self, name):
                h = getattr(self, name)(h)
        return h


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/ds, W/ds), ds = 2**(len(ch_mult)-1). Attention only at the last
    level."""

    def __init__(self, ch, ch_mult, z_channels, num_res_blocks, dropout):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        for i, cout in enumerate(widths):
            last = i == len(widths) - 1
            lvl = Level(ch if i == 0 else widths[i - 1], cout, num_res_blocks, attn=last, dropout=dropout)
            if not last:
                lvl.downsample = Downsample(cout)
            self.conv_blocks.append(lvl)
        c = widths[-1]
        self.mid = nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])
        self.norm_out = Norm(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.conv_blocks:
            h = lvl(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*ds, w*ds). Levels run from the widest (index 0, with attention) to
    ch; each has num_res_blocks+1 res blocks; all but the last end with an Upsample."""

    def __init__(self, ch, ch_mult, z_channels, num_res_blocks, dropout):
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]
        c = widths[0]
        self.conv_in = nn.Conv2d(z_channels, c, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])
        self.conv_blocks = nn.ModuleList()
        for i, cout in enumerate(widths):
            lvl = Level(c if i == 0 else widths[i - 1], cout, num_res_blocks + 1, attn=i == 0,
                        dropout=dropout)
            if i != len(widths) - 1:
                lvl.upsample = Upsample(cout)
            self.conv_blocks.append(lvl)
        self.norm_out = Norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for lvl in self.conv_blocks:
            h = lvl(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour VQ with an L2-normalised codebook. Calling it maps (B, C, h, w) -> indices (B, h*w).
    """

    def __init__(self, n_codes, dim):
        super().__init__()
        # usage tracker of the official code; unused here but part of the state_dict (strict loading needs it)
        self.register_buffer('codebook_used', torch.zeros(65536))
        self.embedding = nn.Embedding(n_codes, dim)
        # direction is all that matters: the codebook is normalised at use
        nn.init.normal_(self.embedding.weight)

    def codebook(self):  # (V, C), unit rows
        return F.normalize(self.embedding.weight, dim=-1)

    def nearest(self, z):
        """z (B, C, h, w) -> (normalised flat z (N, C), idx (N,)), N = B*h*w in row-major (b, y, x) order."""
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
        e = self.codebook()
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()  # (N, V) squared distances
        return zf, d.argmin(1)

    def forward(self, z):
        return self.nearest(z)[1].view(z.shape[0], -1)

    def straight_through(self, z):
        """Training view: returns z_q (B, C, h, w) carrying straight-through gradients to z, idx (B, h*w),
        codebook loss |sg(z) - e|^2 (moves codes) and commitment loss |z - sg(e)|^2 (moves the encoder)."""
        B, C, h, w = z.shape
        zf, idx = self.nearest(z)
        # a one-hot product, not codebook()[idx]: the backward of indexing accumulates with index_put_, whose
        # order varies from run to run on 2+ CPU threads (the same command gave different tokenizers)
        q = F.one_hot(idx, self.embedding.num_embeddings).to(zf.dtype) @ self.codebook()
        codebook_loss = F.mse_loss(q, zf.detach())
        commit_loss = F.mse_loss(zf, q.detach())
        q = zf + (q - zf).detach()  # value = code, gradient flows to the (normalised) encoder output
        return q.view(B, h, w, C).permute(0, 3, 1, 2), idx.view(B, -1), codebook_loss, commit_loss


class VQVAE(nn.Module):
    """FlexVAE: encoder -> quant_conv (1x1, z_channels -> Cvae) -> L2-normalised VQ -> post_quant_conv ->
    decoder. Defaults are the released FlexVAE (344 state_dict keys, 72,049,827 parameters)."""

    def __init__(self, codebook_size=8912, codebook_dim=32, z_channels=256, ch=128, ch_mult=(1, 1, 2, 2, 4),
                 num_res_blocks=2, dropout=0.0):
        super().__init__()
        self.config = dict(codebook_size=codebook_size, codebook_dim=codebook_dim, z_channels=z_channels,
                           ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, dropout=dropout)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, ch_mult, z_channels, num_res_blocks, dropout)
        self.decoder = Decoder(ch, ch_mult, z_channels, num_res_blocks, dropout)
        self.quantize = VectorQuantizer(codebook_size, codebook_dim)  # vqvae.quantize(z) -> idx (B, h*w)
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)

    def encode_conti(self, x):  # (B, 3, H, W) -> (B, Cvae, H/ds, W/ds), continuous
        return self.quant_conv(self.encoder(x))

    def codebook(self):  # (V, Cvae), unit rows
        return self.quantize.codebook()

    def embed(self, idx, pn):  # (B, pn*pn) -> (B, Cvae, pn, pn) normalised code vectors
        return self.codebook()[idx].view(idx.shape[0], pn, pn, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def tokenize(self, x, scales):
        """Images -> [idx (B, pn^2) for pn in scales]: encode once, area-downsample the latent to each
        pn x pn, quantize every scale independently (FlexVAR uses no residuals between scales). The finest
        scale may be coarser than the latent: at 512 px the official code tokenizes up to 16x16 from the
        32x32 latent."""
        h = self.encode_conti(x)
        return [self.quantize(F.interpolate(h, size=(pn, pn), mode='area')) for pn in scales]

    def decode(self, f):  # (B, Cvae, h, w) -> (B, 3, h*ds, w*ds)
        return self.decoder(self.post_quant_conv(f))

    def decode_code(self, idx, pn):  # (B, pn*pn) -> (B, 3, pn*ds, pn*ds)
        return self.decode(self.embed(idx, pn))


def frozen_on(vae, device):
    """The tokenizer moved to `device`, in eval mode, without gradients. Channels-last convolutions on CPU,
    where oneDNN runs them faster; on CUDA the GroupNorms would copy every activation between layouts
    (measured on an H200: encode 61 ms channels-last, 49 ms NCHW)."""
    fmt = torch.channels_last if torch.device(device).type == 'cpu' else torch.preserve_format
    return vae.to(device, memory_format=fmt).eval().requires_grad_(False)


def load_tokenizer(path, device='cpu', trust=False):
    """Our checkpoint {'config', 'model', ...} or the official FlexVAE.pth {'model': state_dict} (then the
    real FlexVAE config) -> VQVAE in eval mode, frozen. Raises UserError for a missing or unreadable file, and
    (through load_state_dict_strict) for weights that do not fit the config, listing the offending keys."""
    ckpt = load_checkpoint(path, trust=trust)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a tokenizer checkpoint (expected a dict with a 'model' state_dict)")
    sd = ckpt.get('model', ckpt)
    if not isinstance(sd, dict):
        raise UserError(f"{path}: 'model' is not a state_dict")
    config = dict(ckpt.get('config') or {})
    try:
        model = VQVAE(**config)
    except TypeError as e:  # a config key VQVAE does not take
        raise UserError(f"{path}: its tokenizer config {config} does not fit VQVAE ({e})") from None
    what = f"tokenizer {path}" + ("" if config else " (no 'config' in it: read as the official FlexVAE)")
    load_state_dict_strict(model, sd, what)
    frozen_on(model, device)
    for k in ('image_size', 'scales'):
        if k in ckpt:
            setattr(model, k, ckpt[k])
    return model

# -----------------------------------------------------------------------------
# 2. training from scratch and the per-scale PSNR evaluation


def psnr(a, b):
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2), averaged over the batch of per-image values."""
    mse = (a.clamp(-1, 1) - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean().item()


def image_at(x, pn, ds):  # the image a pn x pn token map should decode to: x area-downsampled to pn*ds pixels
    return x if x.shape[-1] == pn * ds else F.interpolate(x, size=(pn * ds, pn * ds), mode='area')


def scale_losses(model, h, pn, x, beta, quantize=True):
    """Area-downsample the latent h to pn x pn, quantize it (or, during the warmup, only L2-normalise it),
    decode, and compare with x area-downsampled to the decoded size. Returns (recon MSE, VQ loss, recon, idx
    or None)."""
    z = F.interpolate(h, size=(pn, pn), mode='area')
    if not quantize:
        rec = model.decode(F.normalize(z, dim=1))
        return F.mse_loss(rec, image_at(x, pn, model.downsample)), torch.zeros((), device=h.device), rec, None
    q, idx, cb, commit = model.quantize.straight_through(z)
    rec = model.decode(q)
    return F.mse_loss(rec, image_at(x, pn, model.downsample)), cb + beta * commit, rec, idx


@torch.no_grad()
def kmeans_init(model, batches, n_batches=16, iters=10):
    """Set the codebook to spherical k-means centroids of normalised encoder outputs (n_batches batches).
    Starting from codes that already sit where the encoder puts its vectors gives the decoder small
    quantization errors at once, instead of random codes that most latents are far from."""
    V = model.quantize.embedding.weight.shape[0]
    device = model.quant_conv.weight.device
    z = torch.cat([model.encode_conti(next(batches)[0].to(device)) for _ in range(n_batches)])
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)  # (N, Cvae)
    # k-means++ seeding: each new centre is drawn with probability ~ its cosine distance to the nearest chosen
    # one, so the seeds spread over all clusters (uniform seeding often puts two seeds in one cluster and none
    # in another)
    g = torch.Generator(device='cpu').manual_seed(0)
    c = z[torch.randint(len(z), (V,), generator=g)].clone()
    d = (1 - z @ c[0]).clamp_min(0)  # (N,) distance to the nearest centre so far
    for k in range(1, V):
        i = torch.multinomial((d + 1e-12).cpu(), 1, generator=g)
        c[k] = z[i.to(z.device)]
        d = torch.minimum(d, (1 - z @ c[k]).clamp_min(0))
    for _ in range(iters):
        best, assign = (z @ c.t()).max(1)  # nearest centroid = largest cosine
        count = torch.bincount(assign, minlength=V)
        # per-cluster sums in a fixed order: index_add_ on 2+ CPU threads adds in a varying order, which made
        # two runs of the same command differ
        sums = torch.segment_reduce(z[assign.argsort(stable=True)], 'sum', lengths=count, axis=0)
        c = torch.where(count[:, None] > 0, F.normalize(sums, dim=-1), c)
        empty = (count == 0).nonzero().flatten()
        if len(empty):  # an empty cluster restarts on the worst-served points (splits merged clusters)
            c[empty] = z[best.argsort()[:len(empty)]]
    model.quantize.embedding.weight.copy_(c)


def restart_dead_codes(model, opt, last_used, step, h, patience):
    """Codes not chosen during the last `patience` steps are moved onto random (normalised) encoder outputs of
    the current batch, so the whole codebook stays in use (VQ training otherwise leaves many codes dead, and a
    code that is never chosen gets no gradient). Their Adam moments are reset. Returns the number of restarted
    codes."""
    dead = (last_used < step - patience).nonzero().flatten()
    if len(dead) == 0:
        return 0
    z = F.normalize(h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1]), dim=-1)  # (N, Cvae)
    pick = z[torch.randint(len(z), (len(dead),), device=z.device)]
    w = model.quantize.embedding.weight
    with torch.no_grad():
        w[dead] = pick + 0.01 * torch.randn_like(pick)
    for k in ('exp_avg', 'exp_avg_sq'):
        if k in opt.state.get(w, {}):
            opt.state[w][k][dead] = 0
    last_used[dead] = step  # grace period before a restarted code can be restarted again
    return len(dead)


@torch.no_grad()
def evaluate(model, ds, scales, device, n=1000, batch_size=100):
    """Per-scale PSNR on the first n images of ds: decode each scale's token map and compare with the image
    area-downsampled to the decoded size (finest scale = the full image). Returns {pn: dB}, codebook usage."""
    model.eval()
    n = min(n, len(ds))
    tot = {pn: 0.0 for pn in scales}
    used = torch.zeros(model.config['codebook_size'], dtype=torch.bool)
    for s in range(0, n, batch_size):
        x = torch.stack([ds[i][0] for i in range(s, min(n, s + batch_size))]).to(device)
        for pn, idx in zip(scales, model.tokenize(x, scales)):
            tot[pn] += psnr(model.decode_code(idx, pn), image_at(x, pn, model.downsample)) * len(x)
            used[idx.flatten().cpu()] = True
    return {pn: v / n for pn, v in tot.items()}, used.float().mean().item()


@torch.no_grad()
def save_recon_png(model, ds, scales, path, n=8):
    """Row 0: held-out originals; then one row per scale with that scale's decode, nearest-upsampled to full
    size."""
    x = torch.stack([ds[i][0] for i in range(min(n, len(ds)))]).to(next(model.parameters()).device)
    rows = [x]
    for pn, idx in zip(scales, model.tokenize(x, scales)):
        rows.append(F.interpolate(model.decode_code(idx, pn), size=x.shape[-2:], mode='nearest'))
    save_image_grid(torch.cat(rows).cpu(), path, nrow=len(x))


def train_batches(ds, args, start_step):
    """Iterator over training batches (images, labels) from start_step on; one DataLoader for the whole run,
    so worker processes start once."""
    workers = args.workers
    if workers < 0:
        workers = 0 if not isinstance(ds, ImageFolder) else min(4, max(0, (os.cpu_count() or 1) - 1))
    batches = step_batches(len(ds), args.batch_size, args.batch_size, 1, 0, 1, itertools.count(start_step),
                           args.seed)     # endless: the k-means start draws a few batches of its own
    return iter(torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers))


def train(args):
    from tqdm import tqdm
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    scales = parse_scales(args.scales)
    config = dict(codebook_size=args.codebook_size, codebook_dim=args.codebook_dim,
                  z_channels=args.z_channels, ch=args.ch, num_res_blocks=args.num_res_blocks,
                  ch_mult=tuple(parse_ints(args.ch_mult, '--ch-mult')))
    check_writable(args.out)  # before any work: a bad --out must not cost a training run
    train_ds = load_dataset(args.data, args.image_size, 'train', flip=args.flip, seed=args.seed,
                            crop=args.crop)
    val_ds = load_dataset(args.data, args.image_size, 'val', seed=args.seed)
    if len(train_ds) < args.batch_size:  # every batch is full: an epoch would hold no batch; refuse, not hang
        raise UserError(f"the training split of {args.data} has {len(train_ds)} image(s), fewer than one "
                        f"batch (--batch-size {args.batch_size}); lower --batch-size or add images")
    model = VQVAE(**config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    # the last step each code was chosen
    last_used = torch.zeros(args.codebook_size, dtype=torch.long, device=device)
    step = 0
    if args.resume and os.path.exists(args.out):
        ck = load_checkpoint(args.out, trust=args.trust_checkpoint)
        have = dict(ck.get('config') or {}) if isinstance(ck, dict) else {}
        if 'ch_mult' in have:
            have['ch_mult'] = tuple(have['ch_mult'])
        if have != config:
            raise UserError(f"--resume: {args.out} was trained with {have or 'no config'}, not {config}")
        load_state_dict_strict(model, ck['model'], f"--resume: {args.out}")
        opt.load_state_dict(ck['optimizer'])
        last_used = ck['last_used'].to(device)
        step = ck['step']
        print(f"resumed {args.out} at step {step}")
    elif args.resume:
        print(f"--resume: {args.out} does not exist yet, starting from scratch")

    def save():
        save_atomic({'config': config, 'model': model.state_dict(), 'optimizer': opt.state_dict(),
                     'step': step, 'last_used': last_used.cpu(), 'image_size': args.image_size,
                     'scales': scales, 'args': {k: v for k, v in vars(args).items()}}, args.out)

    model.train()
    batches = train_batches(train_ds, args, step)
    latent = args.image_size // model.downsample
    coarse = [pn for pn in scales if pn < latent]  # the finest loss always uses the full latent
    warm = min(args.ae_warmup, args.steps // 2)  # quantize for at least half of the run
    warmup_lr = max(1, args.steps // 20)
    t0 = time.time()
    # as a context manager the bar is closed on errors too, so an error message starts on its own line
    with tqdm(total=args.steps, initial=step, desc='tokenizer', dynamic_ncols=True) as bar:
        while step < args.steps:
            x, _ = next(batches)
            x = x.to(device, non_blocking=True)
            for gr in opt.param_groups:
                gr['lr'] = lr_at(step, args.steps, args.lr, warmup_lr, end_frac=0.1, hold_frac=0.0)
            if step == warm and step > 0:
                kmeans_init(model, batches)  # end of the warmup: codes start on the encoder's outputs
                last_used.fill_(step)
            vq = step >= warm
            h = model.encode_conti(x)  # (B, Cvae, h, w)
            rec_loss, vq_loss, rec, idx = scale_losses(model, h, h.shape[-1], x, args.beta, vq)
            loss = rec_loss + vq_loss
            if coarse and args.ms_weight > 0:
                # one random coarser scale per step: its token map must decode to the image at that resolution
                pn = coarse[torch.randint(len(coarse), ()).item()]
                # The latent is detached here, so this loss trains only the decoder: sending its gradient
                # into the encoder made the encoder trade fine detail for pool-friendly latents and, measured
                # on the toy set, cost ~2 dB at the finest scale while making the coarse decodes worse.
                r2, _, _, _ = scale_losses(model, h.detach(), pn, x, args.beta, vq)
                loss = loss + args.ms_weight * r2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if vq:
                last_used[idx.flatten()] = step  # finest-scale code usage
                # dead-code restarts, then let the codebook settle
                if step % 25 == 24 and step < 0.8 * args.steps:
                    restart_dead_codes(model, opt, last_used, step, h, patience=50)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr(rec.detach(), x):.2f}")
            if step % args.ckpt_every == 0 or step == args.steps:
                save()
    if step >= args.steps and not os.path.exists(args.out):
        save()  # e.g. --resume of a finished run
    print(f"trained {step} steps in {time.time() - t0:.0f}s -> {args.out}")
    report(model, val_ds, scales, args, device)


def report(model, val_ds, scales, args, device, out=None):
    res, used = evaluate(model, val_ds, scales, device, n=args.eval_images)
    print(f"held-out reconstruction PSNR ({min(args.eval_images, len(val_ds))} images; each scale vs the "
          f"image area-downsampled to the decoded size):")
    print("  scale  tokens  pixels  PSNR(dB)")
    for pn in scales:
        print(f"  {pn:5d}  {pn * pn:6d}  {pn * model.downsample:6d}  {res[pn]:8.2f}")
    print(f"codebook usage on these images: {used:.1%}")
    png = os.path.splitext(out or args.out)[0] + '_recon.png'
    save_recon_png(model, val_ds, scales, png)
    print(f"originals (top row) vs per-scale reconstructions -> {png}")
    return res

# -----------------------------------------------------------------------------
# 3. image data


IMG_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.ppm', '.pgm', '.jfif')
SPLIT_SEED = 0  # the train/val split of real data never depends on --seed, so all runs share the same val set
CROPS = ('center', 'random')
# the official random crop: the short side is first resized to a random size in [S / 1.0, S / 0.88]
MIN_CROP_FRAC, MAX_CROP_FRAC = 0.88, 1.0


def to_rgb(img):
    """Any PIL image -> 8-bit RGB. 16-bit grey is rescaled (PIL's own convert would clip it to white),
    palette/alpha images are flattened, CMYK and grey are converted."""
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
        a = np.asarray(img).astype(np.float64)
        if img.mode != 'F' and a.max() > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), 'L')
    if img.mode == 'P':
        img = img.convert('RGBA')  # palette may carry transparency
    # RGBA/LA: alpha dropped, like torchvision's loader
    return img if img.mode == 'RGB' else img.convert('RGB')


def resize_center_crop(img, size):
    """Resize the shorter side to size (bicubic, antialiased by PIL) then center-crop size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def crop_side_range(size):
    """(smallest, largest) short side the random crop resizes to before cropping size x size:
    ceil(size / MAX_CROP_FRAC) and ceil(size / MIN_CROP_FRAC), computed in integers (0.88 = 88 / 100) so that
    float rounding never adds a pixel."""
    return -(-size * 100 // round(MAX_CROP_FRAC * 100)), -(-size * 100 // round(MIN_CROP_FRAC * 100))


def resize_short_side(img, side):
    """Resize so the shorter side is `side`: first halve with BOX filtering while the short side is still at
    least 2 x side (cheap, and keeps large photos from aliasing), then one BICUBIC resize to the exact size.
    """
    while min(img.size) >= 2 * side:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    w, h = img.size
    s = side / min(w, h)
    size = (side, max(side, round(h * s))) if w <= h else (max(side, round(w * s)), side)
    return img.resize(size, Image.BICUBIC)


def random_crop(img, size, rng):
    """The random crop of the official FlexVAR / SAR training data (ADM's random_crop_arr with crop fractions
    0.88..1): resize the short side to a random integer in crop_side_range(size), then cut a random size x
    size window. rng: a numpy Generator, the only source of randomness."""
    lo, hi = crop_side_range(size)
    img = resize_short_side(img, int(rng.integers(lo, hi + 1)))
    w, h = img.size
    left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return img.crop((left, top, left + size, top + size))


def item_rng(seed):
    """The numpy Generator of one item's random crop / flip: from `seed` when the item was asked for as
    ds[(i, seed)], else from torch's global RNG (which the DataLoader seeds per worker)."""
    if seed is None:
        seed = int(torch.randint(2 ** 62, ()))
    return np.random.default_rng(seed % 2 ** 64)


def to_tensor(arr, flip=False, rng=None):
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], mirrored left-right with probability 1/2 when flip."""
    x = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    if flip and (rng or item_rng(None)).random() < 0.5:
        x = x.flip(-1)
    return x


class ImageDataset(torch.utils.data.Dataset):
    """Base of every dataset load_dataset returns: ds[i] or ds[(i, seed)] -> ((3, S, S) in [-1, 1], label).
    With (i, seed) (seed an int), the item's random crop and flip are drawn from an RNG seeded by `seed`, so a
    training loop that derives the seeds from (run seed, step, position) is reproducible and resumable
    whichever worker reads the item. Datasets without random crop or flip ignore the seed. Subclasses define
    item(i, seed) and have .labels, .class_names, .num_classes."""

    def __getitem__(self, key):
        seed = None
        if isinstance(key, tuple):
            if len(key) != 2 or not all(isinstance(k, (int, np.integer)) for k in key):
                raise TypeError(f"index a dataset with i or (i, seed), two ints; got {key!r}")
            key, seed = key
        return self.item(operator.index(key), None if seed is None else int(seed))


def stratified_split(labels, n_val):
    """Deterministic stratified split: shuffle each class, give every item a rank fraction (k+0.5)/n_class,
    and take the n_val smallest fractions as val, so each class gets ~its share. Returns (train_idx, val_idx).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(SPLIT_SEED)
    frac = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        frac[rng.permutation(idx)] = (np.arange(len(idx)) + 0.5) / len(idx)
    order = np.lexsort((labels, frac))  # by fraction, ties by class
    val = np.sort(order[:n_val])
    train = np.sort(order[n_val:])
    return train, val


def default_val_count(n):
    return min(1000, max(1 if n >= 2 else 0, round(0.05 * n)))  # 5%, at most 1000, at least 1 when possible


def pick_split(labels, split, n_val, where):
    """Indices of the requested split ('train' | 'val' | 'all')."""
    if split == 'all':
        return np.arange(len(labels))
    train, val = stratified_split(labels, n_val)
    idx = {'train': train, 'val': val}.get(split)
    if idx is None:
        raise UserError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
    if len(idx) == 0:
        raise UserError(f"split {split!r} of {where} is empty ({len(labels)} images in total); "
                        f"add more images")
    return idx


class ArrayImages(ImageDataset):
    """Images held in memory as uint8 (N, H, W[, C]) (npz and MNIST). pad=True pads small images (MNIST's 28
    px digits) with black to image_size instead of resizing them, when the border splits evenly. Always the
    centre crop (these sets come at one size)."""

    def __init__(self, images, labels, idx, image_size, flip, class_names, pad=False):
        self.images, self.idx, self.size, self.flip, self.pad = images, idx, image_size, flip, pad
        self.labels = [int(labels[i]) for i in idx]
        self.class_names = class_names
        self.num_classes = len(class_names)

    def __len__(self):
        return len(self.idx)

    def item(self, i, seed):
        a = self.images[self.idx[i]]
        if a.ndim == 2:
            a = a[:, :, None]
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)  # grey -> RGB
        elif a.shape[2] == 4:
            a = a[:, :, :3]  # drop alpha
        h, w = a.shape[:2]
        if self.pad and self.size >= max(h, w) and (self.size - h) % 2 == 0 and (self.size - w) % 2 == 0:
            p = ((self.size - h) // 2, (self.size - w) // 2)
            a = np.pad(a, ((p[0], p[0]), (p[1], p[1]), (0, 0)))  # MNIST: black border, digit keeps its pixels
        elif (h, w) != (self.size, self.size):
            a = np.asarray(resize_center_crop(Image.fromarray(a), self.size))
        return to_tensor(a, self.flip, item_rng(seed) if self.flip else None), self.labels[i]


def check_labels(labels, where):
    """Class labels must be integers 0..K-1 with every id used: the model gets K = max + 1 classes, so a float
    label would be truncated silently and sparse ids (e.g. 1000..1003) would build a 1004-class model."""
    labels = np.asarray(labels)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise UserError(f"{where}: 'labels' must be integers (class ids 0..K-1), got dtype {labels.dtype}")
    labels = labels.astype(np.int64).reshape(-1)
    if len(labels) and labels.min() < 0:
        raise UserError(f"{where}: 'labels' must be >= 0 (class ids 0..K-1), found {int(labels.min())}")
    used = np.unique(labels)
    if len(used) and len(used) != used[-1] + 1:
        raise UserError(f"{where}: 'labels' use {len(used)} distinct class ids between {used[0]} and "
                        f"{used[-1]}; class ids must be 0..K-1 with every id used: remap them to "
                        f"0..{len(used) - 1} "
                        f"(e.g. np.unique(labels, return_inverse=True)[1])")
    return labels


def load_npz(path, image_size, split, flip):
    if not zipfile.is_zipfile(path):  # np.load would call any other file "pickled data"
        raise UserError(f"{path} is not a valid .npz file (not a zip archive); write one with "
                        f"np.savez(path, images=uint8 NHWC array, labels=int array)")
    try:
        with np.load(path) as z:
            key = 'images' if 'images' in z.files else 'arr_0' if 'arr_0' in z.files else None
            if key is None:
                raise UserError(f"{path} has no 'images' (or 'arr_0') array; found {z.files}")
            images = z[key]
            labels = z['labels'] if 'labels' in z.files else np.zeros(len(images), np.int64)
    except UserError:
        raise
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {path} as .npz: {why}") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or \
            (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
        raise UserError(f"{path}: 'images' must be uint8 NHWC (C = 1, 3 or 4) or NHW; "
                        f"got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise UserError(f"{path} holds no images")
    labels = check_labels(labels, path)
    if len(labels) != len(images):
        raise UserError(f"{path}: {len(images)} images but {len(labels)} labels")
    idx = pick_split(labels, split, default_val_count(len(images)), path)
    names = [str(c) for c in range(int(labels.max()) + 1)]
    return ArrayImages(images, labels, idx, image_size, flip, names)


def read_idx(path):
    """An IDX file (optionally gzipped) -> numpy uint8 array.
    Format: 2 zero bytes, type 0x08 (uint8), ndim, then ndim big-endian uint32 sizes, then the data."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        buf = f.read()
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file")
    nd = buf[3]
    shape = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], 'big') for i in range(nd))
    if len(buf) - 4 - 4 * nd != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: header says {shape}")
    return np.frombuffer(buf, np.uint8, offset=4 + 4 * nd).reshape(shape)


def find_idx_pairs(d):
    """{prefix: (images_path, labels_path)} for MNIST-style files in directory d (e.g. prefix 't10k',
    'train')."""
    files = sorted(os.listdir(d))
    pairs = {}
    for f in files:
        for suf in ('-images-idx3-ubyte', '-images-idx3-ubyte.gz', '-images.idx3-ubyte'):
            if f.endswith(suf):
                prefix = f[: -len(suf)]
                lab = [g for g in files if g.startswith(prefix) and '-labels' in g and 'idx1' in g]
                if lab:
                    pairs[prefix] = (os.path.join(d, f), os.path.join(d, lab[0]))
    return pairs


def load_mnist(d, pairs, image_size, split, flip):
    """MNIST IDX folder. With a 'train' and a 't10k' pair: train/val = those files. With one pair (e.g. the
    10k test split alone): a deterministic stratified 80/20 split (8,000 / 2,000)."""
    arrays = {p: (read_idx(i), read_idx(l).astype(np.int64)) for p, (i, l) in pairs.items()}
    # the classes come from the labels of every file, so train and val agree on K (MNIST 10, EMNIST more)
    every = check_labels(np.concatenate([a[1] for a in arrays.values()]), d)
    if 'train' in arrays and 't10k' in arrays and split != 'all':
        images, labels = arrays['train' if split == 'train' else 't10k']
        idx = np.arange(len(images))
    else:
        images, labels = np.concatenate([a[0] for a in arrays.values()]), every
        idx = pick_split(labels, split, round(0.2 * len(images)), d)
    names = [str(c) for c in range(int(every.max()) + 1)]
    return ArrayImages(images, labels, idx, image_size, flip, names, pad=True)


def is_image_name(name):
    return name.lower().endswith(IMG_EXTS) and not name.startswith('.')


def image_classes(root):
    """Sorted names of root's sub-folders that hold at least one image file (searched recursively, stopping at
    the first): the classes, ids 0..K-1. Folders without images are left out, with one warning, so the ids
    stay contiguous and no class exists that no image has."""
    dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    classes = [c for c in dirs
               if any(any(map(is_image_name, names)) for _, _, names in os.walk(os.path.join(root, c)))]
    empty = [c for c in dirs if c not in classes]
    if empty and classes:
        warn_once(f"ignored {len(empty)} class folder(s) without images under {root}: {', '.join(empty[:8])}"
                  f"{' ...' if len(empty) > 8 else ''}")
    return classes


class ImageFolder(ImageDataset):
    """ImageNet layout: root/<class>/**/<image>. Sorted class names -> ids 0..K-1 (folders without images are
    ignored). Unreadable files are skipped and reported once: non-image extensions and files PIL cannot even
    identify are dropped when the folder is listed; files that fail later while decoding (e.g. truncated
    JPEGs) are replaced by the next good image and reported when first met, by whichever worker process meets
    them (the record of bad files is in shared memory, so the warning is not repeated every epoch or per
    worker). crop: 'center' (resize the short side, centre crop) or 'random' (random_crop, the official
    training crop)."""
    # opening every header is cheap for small sets; skip it for ImageNet-size folders
    HEADER_CHECK_MAX = 100_000

    def __init__(self, root, image_size, flip, files=None, class_names=None, crop='center'):
        self.root, self.size, self.flip, self.crop = root, image_size, flip, crop
        if files is None:
            files, class_names = self.scan(root, class_names)
        self.files = [f for f, _ in files]
        self.labels = [c for _, c in files]
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.bad = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()  # found undecodable

    @staticmethod
    def scan(root, classes=None):
        """List (path, class id) of root's images. classes: the class names to use (a val folder takes its
        train folder's), else image_classes(root)."""
        own = image_classes(root)
        if classes is None:
            classes = own
        elif set(own) - set(classes):
            extra = sorted(set(own) - set(classes))
            raise UserError(f"{root} has class folder(s) with images that the training folder lacks: "
                            f"{', '.join(extra[:8])}; both need the same classes")
        if not classes:
            raise UserError(f"no images under {root}: expected the ImageNet layout DIR/<class>/<images> "
                            f"({', '.join(IMG_EXTS)})")
        files, skipped = [], []
        for ci, c in enumerate(classes):
            for dirpath, dirnames, names in os.walk(os.path.join(root, c)):
                dirnames.sort()
                for n in sorted(names):
                    if not n.startswith('.'):
                        p = os.path.join(dirpath, n)
                        files.append((p, ci)) if is_image_name(n) else skipped.append(p)
        if len(files) <= ImageFolder.HEADER_CHECK_MAX:
            good = []
            for p, ci in files:
                try:
                    with Image.open(p) as im:
                        im.size  # header parsed
                    good.append((p, ci))
                except Exception:
                    skipped.append(p)
            files = good
        if skipped:
            warn_once(f"skipped {len(skipped)} unreadable or non-image file(s) under {root} "
                      f"(first: {sorted(skipped)[0]})")
        if not files:
            raise UserError(f"no readable images under {root} (looked for {', '.join(IMG_EXTS)} in class "
                            f"sub-folders)")
        return files, classes

    def __len__(self):
        return len(self.files)

    def load(self, i, rng):
        with Image.open(self.files[i]) as im:
            im.load()  # decode now so truncated data fails here
            img = to_rgb(im)
        if self.crop == 'random':
            return np.asarray(random_crop(img, self.size, rng))
        return np.asarray(resize_center_crop(img, self.size))
        return np.asarray(img)

    def item(self, i, seed):
        rng = item_rng(seed) if self.crop == 'random' or self.flip else None
        for k in range(len(self.files)):
            j = (i + k) % len(self.files)
            if self.bad[j]:
                continue
            try:
                return to_tensor(self.load(j, rng), self.flip, rng), self.labels[j]
            except Exception as e:
                if not self.bad[j]:
                    self.bad[j] = True
                    print(f"warning: skipped unreadable image {self.files[j]} ({type(e).__name__}: {e}); "
                          f"{int(self.bad.sum())} skipped so far", file=sys.stderr)
        raise UserError(f"no image under {self.root} could be decoded")

    def subset(self, idx):
        files = [(self.files[i], self.labels[i]) for i in idx]
        return ImageFolder(self.root, self.size, self.flip, files, self.class_names, self.crop)


def load_image_folder(d, image_size, split, flip, crop):
    tv = [os.path.join(d, s) for s in ('train', 'val')]
    if all(os.path.isdir(p) for p in tv):  # explicit train/val layout: the val folder takes train's class ids
        classes = image_classes(tv[0])
        if split != 'all':
            return ImageFolder(tv[0] if split == 'train' else tv[1], image_size, flip, class_names=classes,
                               crop=crop)
        a, b = (ImageFolder(p, image_size, flip, class_names=classes) for p in tv)
        files = list(zip(a.files + b.files, a.labels + b.labels))
        return ImageFolder(d, image_size, flip, files, classes, crop)
    full = ImageFolder(d, image_size, flip, crop=crop)
    return full.subset(pick_split(full.labels, split, default_val_count(len(full)), d))

# --- the procedural 'toy' dataset ---


TOY_SIZES = {'train': 20000, 'val': 1000}
TOY_CLASSES = ['disc', 'square', 'triangle', 'h-stripes', 'v-stripes', 'two-discs', 'plus', 'ring',
               'diagonal', 'four-squares']
# a base colour per class (RGB in [0, 1]); the class fixes shape, layout and colour, samples jitter around it
TOY_COLOURS = np.array([[0.9, 0.15, 0.1], [0.1, 0.75, 0.2], [0.15, 0.3, 0.95], [0.95, 0.85, 0.1],
                        [0.1, 0.85, 0.9], [0.85, 0.15, 0.8], [1.0, 0.55, 0.05], [0.95, 0.95, 0.95],
                        [0.55, 0.35, 0.15], [0.55, 0.2, 0.9]])


def toy_image(label, rng, size):
    """Render one toy image as (size, size, 3) uint8. Shapes are soft-edged signed-distance masks evaluated on
    the pixel grid, so any resolution works and edges are anti-aliased. Coordinates are in [-1, 1]."""
    t = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(t, t, indexing='ij')  # (S, S) each
    cx, cy = rng.uniform(-0.2, 0.2, 2)  # position jitter
    r = rng.uniform(0.4, 0.6)  # size jitter
    col = np.clip(TOY_COLOURS[label] + rng.normal(0, 0.07, 3), 0, 1)  # colour jitter
    # background: a muted vertical gradient between two random dark colours
    b0, b1 = rng.uniform(0.05, 0.45, 3), rng.uniform(0.05, 0.45, 3)
    w = (y[..., None] + 1) / 2
    img = b0 * (1 - w) + b1 * w  # (S, S, 3)
    px = 2.0 / size  # one pixel in these coordinates: edge softness

    def soft(d):  # signed distance (negative inside) -> coverage in [0, 1]
        return np.clip(0.5 - d / px, 0, 1)
    X, Y = x - cx, y - cy
    if label == 0:  # disc
        m = soft(np.hypot(X, Y) - r)
    elif label == 1:  # axis-aligned square
        m = soft(np.maximum(abs(X), abs(Y)) - r * 0.8)
    elif label == 2:  # upward triangle: three half-planes at inradius r/2 (y points down)
        m = soft(np.maximum(Y, np.maximum(0.866 * X - 0.5 * Y, -0.866 * X - 0.5 * Y)) - r * 0.5)
    elif label == 3:  # horizontal stripes, period 1.6 r
        m = soft((np.abs(((Y / (r * 0.8)) % 2) - 1) - 0.5) * r * 0.8)
    elif label == 4:  # vertical stripes, period 1.6 r
        m = soft((np.abs(((X / (r * 0.8)) % 2) - 1) - 0.5) * r * 0.8)
    elif label == 5:  # two discs side by side
        d = np.minimum(np.hypot(X - r * 0.75, Y), np.hypot(X + r * 0.75, Y)) - r * 0.5
        m = soft(d)
    elif label == 6:  # plus sign
        d = np.minimum(np.maximum(abs(X) - r * 0.25, abs(Y) - r), np.maximum(abs(X) - r, abs(Y) - r * 0.25))
        m = soft(d)
    elif label == 7:  # ring
        m = soft(abs(np.hypot(X, Y) - r * 0.8) - r * 0.2)
    elif label == 8:  # diagonal split: lower-left half coloured
        m = soft((X - Y) / 1.414)
    else:  # 2 x 2 grid of small squares
        d = np.maximum(abs(abs(X) - r * 0.55), abs(abs(Y) - r * 0.55)) - r * 0.3
        m = soft(d)
    img = img * (1 - m[..., None]) + col * m[..., None]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


class ToyDataset(ImageDataset):
    """10 procedural classes, rendered on the fly from (seed, split, index); no download, fully deterministic.
    Label = index % 10 (balanced). train and val use different RNG streams so the sets do not overlap."""

    def __init__(self, image_size, split='train', flip=False, seed=0):
        self.size, self.flip, self.seed = image_size, flip, seed
        self.parts = ['train', 'val'] if split == 'all' else [split]
        if split not in ('train', 'val', 'all'):
            raise UserError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
        self.n = [TOY_SIZES[p] for p in self.parts]
        self.labels = [i % 10 for p in self.parts for i in range(TOY_SIZES[p])]
        self.class_names = list(TOY_CLASSES)
        self.num_classes = 10

    def __len__(self):
        return sum(self.n)

    def item(self, i, seed):
        part = 0 if i < self.n[0] else 1
        j = i - (self.n[0] if part else 0)
        split_id = {'train': 0, 'val': 1}[self.parts[part]]
        rng = np.random.default_rng([self.seed, split_id, j])  # the image: fixed by (--seed, split, index)
        x = to_tensor(toy_image(j % 10, rng, self.size), self.flip, item_rng(seed) if self.flip else None)
        return x, j % 10


def load_dataset(spec, image_size, split='train', flip=False, seed=0, crop='center'):
    """spec: 'toy' | path to .npz | MNIST IDX folder | ImageFolder dir -> Dataset of ((3, S, S) in [-1, 1],
    label), indexable as ds[i] or ds[(i, seed)] (see ImageDataset), with .num_classes, .labels and
    .class_names. seed: the toy set's content seed. crop: 'center', or 'random' = the official training crop
    (random_crop) for ImageFolder data, whose val split always uses the centre crop; in-memory sets (npz,
    MNIST, toy) come at one size and always use the centre crop. Raises UserError when the data are missing,
    empty or bad."""
    if split not in ('train', 'val', 'all'):
        raise UserError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
    if crop not in CROPS:
        raise UserError(f"unknown crop {crop!r}; use 'center' or 'random'")
    if spec == 'toy':
        return ToyDataset(image_size, split, flip, seed)
    path = os.path.expanduser(os.fspath(spec))
    if not os.path.exists(path):
        raise UserError(f"dataset not found: {path} (give 'toy', an .npz file, an MNIST IDX folder or an "
                        f"image folder)")
    if os.path.isfile(path):
        if path.endswith('.npz'):
            return load_npz(path, image_size, split, flip)
        raise UserError(f"{path} is a file but not an .npz; give a folder of class sub-folders, an MNIST "
                        f"folder or an .npz")
    pairs = find_idx_pairs(path)
    if pairs:
        return load_mnist(path, pairs, image_size, split, flip)
    return load_image_folder(path, image_size, split, flip, 'center' if split == 'val' else crop)

# -----------------------------------------------------------------------------
# 4. helpers the three scripts share (tokenizer.py, sar.py, fid.py)


class UserError(Exception):
    """Bad input from the user or bad data: missing or unreadable files, invalid flags, datasets we cannot
    use. The message says what to do; every script's main() prints it as one line `error: ...` (exit status
    2)."""


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


def set_threads(n=0):
    """torch's CPU threads: n if n > 0; else $OMP_NUM_THREADS if it is set (torch already follows it); else
    the cores this process may use minus those other processes keep busy right now. Why: OpenMP threads
    that share a core with another busy process spin-wait for each other, so on a busy 2-core machine a step
    with 2 threads took 5-13x its idle time, and with 1 thread 2.2x. The busy cores are the runnable tasks
    that /proc/loadavg counts now (not the 1-minute average, which still holds the job that just ended), the
    median of 10 looks over ~50 ms; without /proc, every core is used."""
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


def keep_freed_memory():
    """Make glibc's malloc keep the memory it frees instead of handing it back to the OS: by default blocks
    above a threshold (128 KB, adapting up to 32 MB; always above 32 MB) are mmap'd and unmapped when freed,
    and the heap's top is trimmed, so every training step faults its activations and gradients in again,
    page by page, zeroed by the kernel. In a d16 SAR step on 2 cores that was 0.4-0.7M page faults and about
    a fifth of the step; after this, none once the first steps have run (the process keeps its peak size).
    Called at start by tokenizer.py and sar.py; a no-op where the C library is not glibc."""
    if platform.libc_ver()[0] != 'glibc':
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)    # M_MMAP_MAX = 0: large blocks come from the heap too
        libc.mallopt(-1, -1)   # M_TRIM_THRESHOLD = -1: never trim the heap
    except (OSError, AttributeError, TypeError):
        pass


# fp32 matmuls on the CPU. torch sends an fp32 nn.Linear to MKL's sgemm, which on AMD CPUs runs a generic
# code path: on the 2-core AMD EPYC of the benchmarks, 100 GFLOP/s per core against 210 for oneDNN's AVX-512
# kernel, which torch ships too (measured for the d16 shapes, forward and both backward products). linear()
# runs the three products of an fp32 CPU Linear through oneDNN; everything else (autocast to bf16/fp16, CUDA,
# CPUs that are not x86) keeps F.linear. Same math, fp32 rounding differs in the last bits only.
ONEDNN_LINEAR = (torch.backends.mkldnn.is_available() and os.environ.get('SAR_ONEDNN', '1') != '0'
                 and platform.machine().lower() in ('x86_64', 'amd64'))


def _onednn_mm(a, b, bias=None):
    """a (M, K) @ b (N, K)^T [+ bias] -> (M, N), oneDNN's fp32 matmul; strided (transposed) views are fine."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, 'none', [], '')


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b for a 2-D x (M, K); the forward and both gradient products (g W, g^T x) in oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):                                                               # g (M, N)
        x, weight = ctx.saved_tensors
        gx = _onednn_mm(g, weight.t()) if ctx.needs_input_grad[0] else None             # g W
        gw = _onednn_mm(g.t(), x.t()) if ctx.needs_input_grad[1] else None              # g^T x
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x, weight, bias=None):
    """F.linear; in fp32 on an x86 CPU (no autocast, not under torch.compile, which picks its own kernels) its
    forward and backward matmuls run in oneDNN (above). SAR_ONEDNN=0 turns that off."""
    if (ONEDNN_LINEAR and x.device.type == 'cpu' and x.dtype == weight.dtype == torch.float32 and x.numel()
            and not torch.is_autocast_enabled('cpu') and not torch.compiler.is_compiling()):
        y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)             # (M, N), M = rows of x
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) computed by linear() above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


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

# -----------------------------------------------------------------------------
# 5. command line


def get_parser():
    p = ArgumentParser(description="Train the FlexVAE-style VQ tokenizer from scratch (defaults: "
                                "the small laptop config for --data toy: 32 px images, 8x8 latent, scales "
                                "1..8).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--data', default='toy', help="'toy' (built-in procedural set), an .npz (images uint8 NHWC/NHW, "
      "labels), an MNIST IDX folder, or an ImageFolder dir (DIR/<class>/*.png, optionally DIR/train + "
      "DIR/val)")
    a('--image-size', type=int, default=32, help='train/eval resolution in pixels')
    a('--crop', choices=CROPS, default='center', help="training crop of ImageFolder data: 'center' (resize "
      "the short side, centre crop) or 'random' (the official one: short side resized to a random size in "
      "[S, S/0.88], random S x S window); held-out images always use the centre crop")
    a('--flip', action='store_true', help='random horizontal flips for training images')
    a('--out', default='out/tokenizer.pt', help='checkpoint path (written atomically; sar.py reads it by '
      'default)')
    a('--steps', type=int, default=1200, help='number of optimisation steps')
    a('--batch-size', type=int, default=16, help='images per step')
    a('--lr', type=float, default=2e-3, help='peak AdamW learning rate (linear warm-up over 5%% of the '
      'steps, then linear decay to 10%%)')
    a('--codebook-size', type=int, default=1024, help='number of codes V')
    a('--codebook-dim', type=int, default=32, help='code vector size Cvae (the transformer input width)')
    a('--ch', type=int, default=32, help='base channel count of encoder/decoder (FlexVAE: 128)')
    a('--ch-mult', default='1,1,2', help='channel multipliers per level; downsample factor = 2**(levels-1) '
      '(FlexVAE: 1,1,2,2,4)')
    a('--z-channels', type=int, default=64, help='encoder output channels before quant_conv (FlexVAE: 256)')
    a('--num-res-blocks', type=int, default=1, help='res blocks per encoder level (decoder: one more) '
      '(FlexVAE: 2)')
    a('--beta', type=float, default=0.25, help='commitment loss weight')
    a('--ae-warmup', type=int, default=150, help='first N steps train encoder/decoder on the L2-normalised '
      'latent without quantization, then the codebook is set by spherical k-means on encoder outputs '
      '(0 = VQ from step 0)')
    a('--ms-weight', type=float, default=1.0, help='weight of the coarse-scale loss: each step one random '
      'coarser scale is decoded and compared with the image area-downsampled to that size; trains the '
      'decoder only (0 = off)')
    a('--scales', default='1,2,3,4,5,6,8', help='token-map sides pn (increasing; the last <= latent side); '
      'stored in the checkpoint for sar.py')
    a('--ckpt-every', type=int, default=200, help='save a checkpoint every N steps (and at the end)')
    a('--resume', action='store_true', help='continue from the checkpoint at --out (model, optimizer, step)')
    a('--eval-only', metavar='CKPT', default=None, help='skip training: print the per-scale PSNR table of '
      'CKPT (ours or an official FlexVAE.pth) and write its reconstruction PNG next to it')
    a('--eval-images', type=int, default=1000, help='held-out images used for the final PSNR table')
    a('--trust-checkpoint', action='store_true', help='allow full unpickling of checkpoints (only for files '
      'you trust)')
    a('--seed', type=int, default=0, help='random seed (model init, data order, toy data)')
    a('--device', default='cpu', help="torch device, e.g. 'cpu' or 'cuda'")
    a('--workers', type=int, default=-1, help='DataLoader worker processes (-1: 0 for in-memory data, else '
      'up to 4)')
    a('--threads', type=int, default=0, help='torch CPU threads (0: $OMP_NUM_THREADS if set, else the cores '
      'that other processes leave free; see set_threads)')
    return p


def check_args(args):
    """Every flag checked before any work, so a typo costs seconds, not a training run."""
    for flag, low in (('steps', 1), ('batch_size', 1), ('image_size', 1), ('codebook_size', 1),
                      ('codebook_dim', 1), ('ch', 1), ('z_channels', 1), ('num_res_blocks', 1),
                      ('ckpt_every', 1), ('eval_images', 1), ('ae_warmup', 0), ('threads', 0),
                      ('workers', -1)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    for flag, positive in (('lr', True), ('beta', False), ('ms_weight', False)):
        v = getattr(args, flag)
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number "
                            f"{'> 0' if positive else '>= 0'}, got {v}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device; use e.g. 'cpu' or 'cuda'") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    scales = parse_scales(args.scales)
    if args.eval_only:  # the checkpoint's own sizes are checked once it is loaded
        return
    ds = 2 ** (len(parse_ints(args.ch_mult, '--ch-mult')) - 1)
    if args.image_size % ds:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the downsample factor {ds} "
                        f"(--ch-mult has {int(math.log2(ds)) + 1} levels)")
    check_scales(scales, args.image_size // ds)


def eval_only(args):
    model = load_tokenizer(args.eval_only, args.device, trust=args.trust_checkpoint)
    size = getattr(model, 'image_size', args.image_size)
    scales = getattr(model, 'scales', None) or parse_scales(args.scales)
    if size % model.downsample:
        raise UserError(f"--image-size {size} is not a multiple of the tokenizer's downsample factor "
                        f"{model.downsample}")
    check_scales(scales, size // model.downsample)
    check_writable(os.path.splitext(args.eval_only)[0] + '_recon.png', 'the reconstruction PNG')
    val = load_dataset(args.data, size, 'val', seed=args.seed)
    report(model, val, scales, args, args.device, out=args.eval_only)


def main(argv=None):
    try:
        args = get_parser().parse_args(argv)
        set_threads(args.threads)
        keep_freed_memory()
        check_args(args)
        eval_only(args) if args.eval_only else train(args)
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    main()
