"""
The FlexVAE tokenizer (LlamaGen-style VQ-16 with an L2-normalised codebook) used by FlexVAR / SAR: the model,
its training from scratch, its per-scale evaluation and its command line.

Reading order:
  1. the VQ-VAE: encoder, quant_conv, codebook, post_quant_conv, decoder, with the official state_dict names
     so the released FlexVAE.pth loads with strict=True; multi-scale tokenization (VQVAE.tokenize) and
     load_tokenizer. The teacher-forcing input built from the token maps lives in sar.py (sar.tf_input).
  2. training from scratch (python tokenizer.py --data toy) and the per-scale PSNR evaluation
  3. the command line (get_parser, main)
The images come from data.py (load_dataset), the shared helpers (errors, atomic writes, checkpoints, the LR
schedule) from common.py.

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
import itertools
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu_speed
from common import (ArgumentParser, UserError, check_scales, check_writable, error_line, load_checkpoint,
                    load_state_dict_strict, lr_at, parse_ints, parse_scales, pick_device, save_atomic,
                    save_image_grid, step_batches)
from data import CROPS, ImageFolder, load_dataset

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
    where oneDNN runs them faster; on CUDA the GroupNorms would copy every activation between layouts, which
    made the encode slower (docs/benchmarks.md)."""
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
            if step % 10 == 0 or step == args.steps:  # .item() waits for a GPU: not at every step
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
# 3. command line


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
    a('--flip', action=argparse.BooleanOptionalAction,
      help='random horizontal flips of training images (on for colour photos, off for grey data and toy)')
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
    a('--device', default='auto', help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
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
    args.device = str(pick_device(args.device))   # as sar.py: auto takes the GPU (train.sh passes no --device)
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
        cpu_speed.apply(threads=args.threads)   # threads and allocator (cpu_speed.py)
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
