"""
SAR -- Self-Autoregressive Refinement for scale-wise autoregressive image generators, in one file.

Paper: "Rethinking Training Dynamics in Scale-wise Autoregressive Generation" (arXiv 2512.06421). Equation
numbers in the comments refer to it. The generator is FlexVAR (state-dict compatible with the official
FlexVAR/SAR checkpoints); the multi-scale tokenizer lives in tokenizer.py.

Read top to bottom, this file follows the method:
  1. config / CLI
  2. attention and the AdaLN block
  3. the scale-wise transformer and its block-causal scale mask
  4. teacher forcing (eq. 2, 4)
  5. Stagger-Scale Rollout (eq. 5-6) and the Contrastive Student-Forcing Loss (eq. 10-11)
  5b. what SAR replaces: naive student forcing (eq. 3), and the exposure-bias diagnostic (section 3)
  6. the training loop (1 process or torchrun DDP, AMP, atomic checkpoints, exact resume)
  7. sampling (KV cache, classifier-free guidance), then the --bench and --diagnose commands
  8. main

Shapes: B batch, L tokens of a whole scale list, C model width, H heads, V codebook size, Cv codebook dim.
A "scale list" is a list of side lengths pn_0 < pn_1 < ... (scale i holds pn_i^2 tokens, row-major).
"""

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# 1. config / CLI
# ----------------------------------------------------------------------------------------------------------

OFFICIAL_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # FlexVAR's default list at 256 px (L = 680)
LAPTOP_SCALES = (1, 2, 3, 4, 5, 6, 8)                # the toy configuration (8x8 latent, L = 155)


class UserError(Exception):
    """Bad input from the user: printed as one line `error: ...` by main(), never as a traceback."""


def parse_scales(text):
    """'1,2,3,4' -> [1, 2, 3, 4]; checks the list is strictly increasing and positive."""
    try:
        scales = [int(s) for s in str(text).replace('_', ',').split(',') if s.strip()]
    except ValueError:
        raise UserError(f"invalid scale list {text!r}: expected comma-separated integers such as 1,2,3,4,6,8")
    check_scales(scales)
    return scales


def check_scales(scales, latent=None):
    if len(scales) < 2:
        raise UserError(f"scale list {scales} needs at least two scales")
    if scales[0] < 1 or any(b <= a for a, b in zip(scales, scales[1:])):
        raise UserError(f"scale list {scales} must be strictly increasing positive side lengths, e.g. 1,2,3,4,6,8")
    if latent is not None and scales[-1] > latent:
        raise UserError(f"scale list {scales} goes beyond the tokenizer's {latent}x{latent} latent; "
                        f"the finest scale must be <= {latent}")


DEFAULT_VAE = os.path.join('out', 'tokenizer.pt')   # where `python tokenizer.py` writes by default


def get_parser():
    p = argparse.ArgumentParser(
        description="SAR: train FlexVAR with teacher forcing (--mode tf) or post-train it with Self-Autoregressive "
                    "Refinement (--mode sar); sample with --sample; time steps with --bench. With no arguments: the "
                    "laptop configuration (depth 4 on the toy data, tokenizer from `python tokenizer.py`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    g = p.add_argument_group('what to run')
    g.add_argument('--mode', choices=['tf', 'sar', 'sf'], default='tf',
                   help="tf: teacher-forcing pretraining (eq. 2); sar: SAR post-training, L_TF + gamma * L_CSF (eq. 11); "
                        "sf: naive student forcing (eq. 3, section 4.1), an ablation, see --sf-schedule")
    g.add_argument('--sample', action='store_true', help="generate images from --ckpt instead of training")
    g.add_argument('--bench', action='store_true', help="time training steps (random weights) and exit")
    g.add_argument('--diagnose', action='store_true',
                   help="exposure-bias diagnostic of --ckpt on held-out images: per-scale CE/accuracy with teacher-forced "
                        "inputs vs inputs built from the model's own predictions (writes <out-dir>/diagnose.json)")
    g = p.add_argument_group('model and data')
    g.add_argument('--depth', type=int, default=4, help="transformer depth; width = 64*depth, heads = depth (official: 16/20/24)")
    g.add_argument('--data', default='toy', help="'toy', an ImageFolder dir, an .npz (images, labels) or an MNIST IDX dir")
    g.add_argument('--vae', default=None, help=f"tokenizer checkpoint: ours (python tokenizer.py) or the official FlexVAE.pth "
                                               f"(training default: {DEFAULT_VAE}; sampling default: the one the checkpoint names)")
    g.add_argument('--image-size', type=int, default=32, help="training resolution (official: 256 px, 512 in the code's default)")
    g.add_argument('--scales', default=','.join(map(str, LAPTOP_SCALES)),
                   help="scale list (side lengths); with --scale-schedule random it is the longest list and its last "
                        "entry the finest scale (official: 1,2,3,4,5,6,8,10,13,16)")
    g.add_argument('--scale-schedule', choices=['random', 'fixed'], default='random',
                   help="random: FlexVAR's random scale list per step (official); fixed: always --scales")
    g.add_argument('--num-classes', type=int, default=0, help="number of classes (0: from the dataset; official checkpoints: 1000)")
    g.add_argument('--init', default='', help="initial weights: an official FlexVAR/SAR checkpoint or one of ours (e.g. the tf run's ckpt.pt)")
    g.add_argument('--trust-checkpoint', action='store_true',
                   help="allow loading checkpoints that need full unpickling (only for files you trust)")
    g = p.add_argument_group('SAR (section 4.2); defaults = what the official scripts actually run')
    g.add_argument('--sf-transitions', choices=['last', 'all'], default='last',
                   help="last: official, one SF pass for the last pair of scales with context [class, input]; "
                        "all: eq. 6/8, every scale student-forced in one pass over the shifted sequence")
    g.add_argument('--csf-target', choices=['teacher', 'gt'], default='teacher',
                   help="teacher: eq. 10 / official, tokens drawn from the teacher-forced logits; gt: Algorithm 1 line 24")
    g.add_argument('--sf-input', choices=['argmax', 'sample', 'cfg'], default='cfg',
                   help="how teacher predictions become SF inputs: argmax (Alg. 1), sample (top-k/top-p), "
                        "cfg (sampling with CFG: the official trainer's default; Table 5)")
    g.add_argument('--sf-top-k', type=int, default=900, help="top-k for SF sampling (official 900; capped at V)")
    g.add_argument('--sf-top-p', type=float, default=0.96, help="top-p for SF sampling (official trainer 0.96, paper 0.95)")
    g.add_argument('--sf-cfg', type=float, default=1.2, help="CFG scale for SF sampling (official trainer 1.2, ramped; paper Table 5: 2.5)")
    g.add_argument('--gamma', type=float, default=0.01, help="weight of the CSF loss, eq. 11 (official sigma 0.01)")
    g = p.add_argument_group('naive student forcing (--mode sf; section 4.1, Table 3: ablations, not a recipe)')
    g.add_argument('--sf-schedule', choices=['full', 'alternate', 'interleave', 'hybrid'], default='full',
                   help="full: every input from the model's own rollout (eq. 3); alternate: TF and full SF on "
                        "alternating steps; interleave: odd scales (1-based) TF, even scales SF; hybrid: TF up to "
                        "scale side --sf-hybrid-k, SF beyond. SF rollouts draw tokens as --sf-input says")
    g.add_argument('--sf-hybrid-k', type=int, default=4, help="hybrid@k: scales of side <= k keep teacher-forced inputs")
    g = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=1200, help="optimizer steps")
    g.add_argument('--batch-size', type=int, default=32, help="global batch size (split over processes and --grad-accum)")
    g.add_argument('--grad-accum', type=int, default=1, help="gradient accumulation micro-steps per optimizer step")
    g.add_argument('--lr', type=float, default=None,
                   help="peak learning rate. Default: 1e-3 (tf) / 3e-4 (sar) for depth < 12; for the official sizes the "
                        "official rule: tf 1e-4*B/256; sar 4.68e-5*B/768 decaying to 3e-5*B/768 (the LR the released "
                        "SAR run actually used; the paper says constant 1e-4: --lr 1e-4 --lr-end 1)")
    g.add_argument('--lr-end', type=float, default=None, help="final LR as a fraction of --lr (tf 0.1; sar: 0.641 at the official sizes, 1 = constant for small models)")
    g.add_argument('--warmup-steps', type=int, default=None, help="linear warm-up steps (tf: 2%% of --steps; sar: 0)")
    g.add_argument('--weight-decay', type=float, default=0.05, help="AdamW weight decay on matrices (betas 0.9, 0.95)")
    g.add_argument('--grad-clip', type=float, default=2.0, help="gradient-norm clipping")
    g.add_argument('--cond-drop', type=float, default=0.1, help="class dropout probability (trains the unconditional model for CFG)")
    g.add_argument('--label-smoothing', type=float, default=0.0, help="label smoothing of the cross entropy")
    g.add_argument('--drop-path', type=float, default=None, help="max stochastic-depth rate (default 0.1*depth/24)")
    g.add_argument('--init-gamma', type=float, default=1e-3, help="init scale of the AdaLN residual gates (official --alng)")
    g.add_argument('--flip', action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    g.add_argument('--dtype', choices=['auto', 'bf16', 'fp16', 'fp32'], default='auto',
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 uses a GradScaler")
    g.add_argument('--compile', action='store_true', help="torch.compile the model")
    g = p.add_argument_group('run')
    g.add_argument('--out-dir', default='', help="output folder (default out/<mode>): ckpt.pt, log.jsonl, samples")
    g.add_argument('--resume', action='store_true', help="continue from <out-dir>/ckpt.pt if it exists")
    g.add_argument('--stop-at', type=int, default=0, help="stop after this step as if interrupted (time-sliced jobs); "
                                                         "--resume continues with the same schedule")
    g.add_argument('--ckpt-every', type=int, default=200, help="write the checkpoint (atomically) every N steps and at the end")
    g.add_argument('--log-every', type=int, default=50, help="log every N steps (stdout + <out-dir>/log.jsonl)")
    g.add_argument('--seed', type=int, default=0, help="seed of everything random in training")
    g.add_argument('--data-seed', type=int, default=0, help="seed of the data order and of the toy data")
    g.add_argument('--device', default='auto', help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    g.add_argument('--workers', type=int, default=1, help="DataLoader worker processes")
    g.add_argument('--quiet', action='store_true', help="no progress bar; log lines only")
    g = p.add_argument_group('sampling (--sample)')
    g.add_argument('--ckpt', default='', help="checkpoint to sample from (ours, or an official FlexVAR/SAR file with --vae)")
    g.add_argument('--cfg', type=float, default=None, help="guidance scale (default: 1.5 for our checkpoints; official d16/d20/d24: 2.2/2.6/3.3)")
    g.add_argument('--cfg-form', choices=['var', 'llamagen'], default='var',
                   help="var: official ramped schedule; llamagen: constant u + cfg*(c-u)")
    g.add_argument('--top-k', type=int, default=900, help="top-k at sampling (official 900; capped at V)")
    g.add_argument('--top-p', type=float, default=0.95, help="top-p at sampling (official 0.95)")
    g.add_argument('--classes', default='all', help="'all' or a comma-separated list of class ids")
    g.add_argument('--num-samples', type=int, default=8, help="images per class")
    g.add_argument('--sample-batch', type=int, default=64, help="images per forward batch when sampling")
    g.add_argument('--sample-scales', default=None, help="scale list at sampling (default: the training --scales)")
    g.add_argument('--save-npz', default='', help="also write all samples to this .npz (arr_0 uint8 NHWC, labels), streamed")
    g.add_argument('--save-png', action='store_true', help="also write one PNG per image under <out-dir>/samples/")
    g.add_argument('--trajectory', action='store_true', help="write the image decoded after every scale (paper Fig. 7)")
    g = p.add_argument_group('benchmark (--bench)')
    g.add_argument('--bench-steps', type=int, default=6, help="timed steps (the first one is warm-up, excluded)")
    g = p.add_argument_group('exposure-bias diagnostic (--diagnose)')
    g.add_argument('--diag-images', type=int, default=1000, help="held-out images to evaluate (from the 'val' split)")
    g.add_argument('--peak-tflops', type=float, default=989.0, help="accelerator peak for MFU (H100 bf16 dense: 989)")
    return p


def resolve_defaults(args):
    """Parse the scale lists and fill the mode- and size-dependent defaults (documented in --help)."""
    if isinstance(args.scales, str):
        args.scales = parse_scales(args.scales)
    if isinstance(args.sample_scales, str):
        args.sample_scales = parse_scales(args.sample_scales)
    official = args.depth >= 12
    if args.lr is None:
        if official:
            args.lr = 1e-4 * args.batch_size / 256 if args.mode == 'tf' else 4.68e-5 * args.batch_size / 768
        else:
            args.lr = 1e-3 if args.mode == 'tf' else 3e-4
    if args.lr_end is None:
        args.lr_end = 0.1 if args.mode == 'tf' else (3.0 / 4.68 if official else 1.0)
    if args.warmup_steps is None:
        args.warmup_steps = args.steps // 50 if args.mode == 'tf' else 0
    return args


# ----------------------------------------------------------------------------------------------------------
# 2. attention and the AdaLN block (FlexVAR keeps VAR's blocks; key names match the official state_dict)
# ----------------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q/k and a learned per-head temperature.

    Normalising q and k bounds the logits, which keeps attention stable in fp16/bf16; the temperature
    exp(scale_mul) (initialised to 4, capped at 100) then restores sharpness, so SDPA runs with scale=1.
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer('zero_k_bias', torch.zeros(dim))  # k has no bias, but the official file stores zeros
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask, cache=None):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                  # each (B, H, L, 64)
        temperature = self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
        q = F.normalize(q, dim=-1) * temperature
        k = F.normalize(k, dim=-1)
        if cache is not None:  # sampling: keys/values of all coarser scales are kept, the new scale attends to all
            if 'k' in cache:
                k, v = torch.cat((cache['k'], k), dim=2), torch.cat((cache['v'], v), dim=2)
            cache['k'], cache['v'] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)   # (B, H, L, 64)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


def drop_path(x, p, training):
    """Stochastic depth per sample (the residual branch of a whole sample is dropped, the rest rescaled)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p)
    return x * keep / (1 - p)


class AdaLNBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the class embedding (adaptive LayerNorm).

    The class condition enters every block through 6 vectors: gamma (residual gates), scale and shift for the
    attention and the FFN branch. The official order of the 6 chunks is gamma1, gamma2, scale1, scale2, shift1, shift2.
    """

    def __init__(self, dim, heads, drop_path_rate, eps=1e-6):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.ffn = FFN(dim, 4 * dim)
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.drop_path_rate = drop_path_rate

    def forward(self, x, cond_BC, attn_mask, cache=None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BC).view(-1, 1, 6, x.shape[-1]).unbind(2)
        h = self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, attn_mask, cache)
        x = x + drop_path(h * gamma1, self.drop_path_rate, self.training)
        h = self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2)
        return x + drop_path(h * gamma2, self.drop_path_rate, self.training)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, cond_BC):
        scale, shift = self.ada_lin(cond_BC).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------------
# 3. the scale-wise transformer and its block-causal scale mask
# ----------------------------------------------------------------------------------------------------------

def scale_index(scales, device=None):
    """(L,) the scale each token belongs to: [0, 1,1,1,1, 2,...] for scales 1,2,3,..."""
    return torch.cat([torch.full((pn * pn,), i, dtype=torch.long, device=device) for i, pn in enumerate(scales)])


def block_causal_mask(scales, device=None):
    """(L, L) bool, True = may attend. Eq. (1) factorises p(f_1..f_n) over scales, so a token sees every token
    of its own scale (they are predicted together, in parallel) and of all coarser scales, never a finer one."""
    d = scale_index(scales, device)
    return d[:, None] >= d[None, :]


def attn_bias(scales):
    """The same mask in the official additive form (1, 1, L, L): 0 allowed, -inf masked."""
    m = block_causal_mask(scales)
    return torch.zeros(m.shape).masked_fill_(~m, float('-inf'))[None, None]


class FlexVAR(nn.Module):
    """The scale-wise AR transformer. `depth` is the one size knob: width C = 64*depth, heads = depth.

    Input sequence for a scale list pn_0..pn_{K-1} (teacher forcing, eq. 2): scale 0 is the class token
    (pn_0^2 copies of the class embedding + pos_start); scale i >= 1 holds the codebook vectors of scale i-1
    bicubically upsampled to pn_i x pn_i -- each scale is predicted from the *previous* scale, "scale shift".
    Positions come from one learned 32x32 grid area-resampled to each scale, so any scale list works.
    """

    def __init__(self, depth=16, vocab_size=8912, num_classes=1000, codebook_dim=32, drop_path_rate=None):
        super().__init__()
        C, H = 64 * depth, depth
        self.config = dict(depth=depth, vocab_size=vocab_size, num_classes=num_classes, codebook_dim=codebook_dim)
        self.depth, self.C, self.V, self.num_classes = depth, C, vocab_size, num_classes
        dpr = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        self.word_embed = nn.Linear(codebook_dim, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)      # row `num_classes` is the unconditional class
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, C, 32, 32))  # learned 2-D position grid
        self.blocks = nn.ModuleList([AdaLNBlock(C, H, r) for r in torch.linspace(0, dpr, depth).tolist()])
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, vocab_size)

    # ---- inputs -------------------------------------------------------------------------------------
    def pos_embed(self, scales):
        """(1, L, C): the 32x32 grid area-pooled to every scale (pn=1 gives the grid mean), row-major."""
        return torch.cat([F.interpolate(self.pos_1LC, size=(pn, pn), mode='area').flatten(2).transpose(1, 2)
                          for pn in scales], dim=1)

    def embed(self, label_B, x_BLCv, scales, first_pos=True):
        """Token embeddings (B, L, C) of [class token(s)] + word_embed(inputs), plus positions.

        first_pos=False leaves pos_start off the class token: the official student-forcing pass does that."""
        B, first_l = label_B.shape[0], scales[0] ** 2
        cond_BC = self.class_emb(label_B)
        sos = cond_BC[:, None, :].expand(B, first_l, -1)
        if first_pos:
            sos = sos + self.pos_start.expand(B, first_l, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv.float())), dim=1) if x_BLCv is not None else sos
        return x + self.pos_embed(scales), cond_BC

    def logits(self, x_BLC, cond_BC):
        return self.head(self.head_nm(x_BLC, cond_BC)).float()

    # ---- the teacher-forcing forward (all scales in parallel, one pass) ----------------------------------
    def forward(self, label_B, x_BLCv, scales, first_pos=True):
        """label_B (B,) class ids (num_classes = unconditional); x_BLCv (B, L - pn_0^2, Cv) inputs of scales 1..K-1.
        Returns logits (B, L, V) for the tokens of every scale."""
        # Positions and embeddings stay fp32 even under autocast (as in the official code).
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            x, cond_BC = self.embed(label_B, x_BLCv, scales, first_pos)
        mask = block_causal_mask(scales, x.device)
        for block in self.blocks:
            x = block(x, cond_BC, mask)
        return self.logits(x, cond_BC)

    # ---- initialisation (only for training from scratch; official rules, spec 1.12) ----------------------
    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02):
        std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, 'bias', None) is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std)
        self.pos_1LC.copy_(sincos_grid(self.C))
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            b.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)     # scales and shifts
            b.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)  # the two residual gates start near 0
            b.attn.scale_mul_1H11.fill_(math.log(4.0))
            b.attn.q_bias.zero_(), b.attn.v_bias.zero_()
        return self


def sincos_grid(C, size=32):
    """(1, C, size, size): even channels sin(row * w_j), odd channels cos(col * w_j), w_j = 10000^(-2j/C)."""
    w = torch.exp(-torch.arange(C // 2, dtype=torch.float64) * 2 * math.log(10000.0) / C)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing='ij')
    grid = torch.empty(C, size, size, dtype=torch.float64)
    grid[0::2] = torch.sin(ys[None] * w[:, None, None])
    grid[1::2] = torch.cos(xs[None] * w[:, None, None])
    return grid[None].float()


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ---- loading official and our own checkpoints -------------------------------------------------------------

def extract_state_dict(ckpt):
    """Accept every layout in the wild: ours {'model': sd}, the official training output
    {'trainer': {'var_wo_ddp': sd}}, or a flat FlexVAR state_dict (the released FlexVARd*-epo*.pth)."""
    if 'trainer' in ckpt and isinstance(ckpt['trainer'], dict) and 'var_wo_ddp' in ckpt['trainer']:
        sd = ckpt['trainer']['var_wo_ddp']
    elif 'model' in ckpt and isinstance(ckpt['model'], dict):
        sd = ckpt['model']
    else:
        sd = ckpt
    sd = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in sd.items()}
    # The official file stores the mask built for whatever scale list its last step used: always stale.
    sd.pop('attn_bias_for_masking', None)
    return sd


def config_from_state_dict(sd):
    """Infer (depth, V, num_classes, Cv) from the shapes, so a checkpoint describes itself."""
    if 'pos_start' not in sd or 'head.weight' not in sd:
        raise UserError("this file is not a FlexVAR/SAR transformer checkpoint (no 'pos_start' / 'head.weight' keys)")
    depth = sd['pos_start'].shape[-1] // 64
    return dict(depth=depth, vocab_size=sd['head.weight'].shape[0], num_classes=sd['class_emb.weight'].shape[0] - 1,
                codebook_dim=sd['word_embed.weight'].shape[1])


def load_state_dict_strict(model, sd, what='checkpoint'):
    """Strict load with a readable report of missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shaped = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shaped:
        def show(keys):
            return ', '.join(keys[:8]) + (f' ... (+{len(keys) - 8})' if len(keys) > 8 else '') if keys else 'none'
        raise UserError(f"{what} does not match the model {model.config}: missing keys: {show(missing)}; "
                        f"unexpected keys: {show(unexpected)}; mis-shaped: {show(shaped)}")
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------------------------
# 4. teacher forcing (eq. 2, 4)
# ----------------------------------------------------------------------------------------------------------

def begin_ends(scales):
    """[(start, end)] token range of every scale in the flattened sequence."""
    out, start = [], 0
    for pn in scales:
        out.append((start, start + pn * pn))
        start += pn * pn
    return out


@torch.no_grad()
def gt_tokens_and_inputs(vae, images, scales):
    """The ground truth of eq. (2): per-scale token maps t_i of the image (list of (B, pn_i^2)), and the
    teacher-forcing input (B, L - pn_0^2, Cv): scale i-1's codebook vectors upsampled to pn_i (scale shift)."""
    gt_idx = vae.tokenize(images, scales)
    return gt_idx, vae.tf_input(gt_idx, scales)


def drop_labels(labels, p, num_classes, generator=None):
    """Class dropout for classifier-free guidance: with probability p a sample becomes unconditional."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def token_ce(logits_BLV, target_BL, label_smoothing=0.0):
    """Token-mean cross entropy (the official loss: uniform 1/L per token, no per-scale weights)."""
    return F.cross_entropy(logits_BLV.flatten(0, 1).float(), target_BL.flatten(), label_smoothing=label_smoothing)


@torch.no_grad()
def per_scale_stats(logits_BLV, target_BL, scales):
    """Per-scale cross entropy and token accuracy (the exposure-bias diagnostics look at these)."""
    ce = F.cross_entropy(logits_BLV.flatten(0, 1).float(), target_BL.flatten(), reduction='none').view(target_BL.shape)
    acc = (logits_BLV.argmax(-1) == target_BL).float()
    return {pn: (ce[:, a:b].mean().item(), acc[:, a:b].mean().item()) for pn, (a, b) in zip(scales, begin_ends(scales))}


def random_scales(default_scales, rng):
    """FlexVAR's random scale list per step (spec 3.1). Training on many lists makes the model work for any
    list at inference. For default_scales = 1,2,...,13,16 this is exactly the official distribution; for
    another finest scale F (the laptop's 8) the same recipe is scaled: picks below/above round(10F/16),
    token budget = sum(pn^2) of the default list."""
    if rng.random() < 0.05:
        return list(default_scales)
    final = default_scales[-1]
    budget = sum(pn * pn for pn in default_scales)
    split = round(final * 10 / 16)
    lo, hi = list(range(3, split + 1)), list(range(split + 1, final))
    scales = [1, 2] + sorted(rng.sample(lo, min(5, len(lo))) + rng.sample(hi, min(2, len(hi)))) + [final]
    u = rng.random()
    for threshold in (0.9, 0.95, 0.98, 0.99):  # occasionally drop a middle scale (up to four)
        if u > threshold and len(scales) > 4:
            scales.pop(rng.randint(2, len(scales) - 2))
    while sum(pn * pn for pn in scales) > budget:  # stay inside the token budget: drop among the last four
        scales.pop(rng.randint(len(scales) - 4, len(scales) - 1))
    return scales


# ----------------------------------------------------------------------------------------------------------
# 5. SAR: Stagger-Scale Rollout (eq. 5-6) and the Contrastive Student-Forcing Loss (eq. 10-11)
# ----------------------------------------------------------------------------------------------------------
#
# Pass 1 is ordinary teacher forcing: f^(T)_i = g(f_{1:i-1}) for all scales at once (eq. 4/7).
# Its predictions are turned into tokens without gradient (argmax, sampling, or sampling with CFG), embedded,
# and upsampled to the next scale (eq. 5): the model's own output, shaped exactly like an inference input.
# Pass 2 runs the model once more on those inputs: the one-step student-forced predictions f^(S)_i (eq. 6/8).
# CSFL (eq. 10) pulls f^(S) towards the teacher-forced prediction, not towards the ground truth: the student
# input has drifted from the GT hierarchy, so the GT would be a contradictory target (the naive-SF failure, 4.1).
#
# Paper vs official code (each is a flag; the default is what the official scripts actually run):
#   --sf-transitions last|all : the official code student-forces one transition per step, the last pair of
#       the step's scale list (k = K-2 -> K-1), with the context [class token, upsampled sample] only;
#       eq. 6/8 student-force every scale at once over the whole shifted sequence with the block-causal mask.
#   --csf-target teacher|gt   : eq. 10 and the official code use the teacher-forced prediction (a token drawn
#       from the pass-1 logits); Algorithm 1 line 24 writes the ground truth.
#   --sf-input argmax|sample|cfg : how pass-1 predictions become tokens. Algorithm 1 says "e.g. argmax"; the
#       official trainer (its flags are silently ignored by train.py) samples with CFG 1.2 (ramped), top-k 900,
#       top-p 0.96; Table 5's best is CFG 2.5, top-k 900, top-p 0.95.
#   --gamma: weight of L_CSF in eq. (11), official 0.01.

def sample_top_k_top_p(logits, top_k=0, top_p=0.0, generator=None):
    """Draw one token per row from logits (..., V), restricted to the top-k logits and then to the smallest
    set of tokens holding top_p of the probability mass (the most likely token always stays).
    top_k == 1 is greedy and consumes no randomness."""
    V = logits.shape[-1]
    if top_k == 1:
        return logits.argmax(-1)
    logits = logits.float().clone()
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float('-inf'))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1)                       # ascending
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p         # low-probability tail to remove
        tail[..., -1] = False
        logits.masked_fill_(tail.scatter(-1, order, tail), float('-inf'))
    probs = logits.softmax(-1).view(-1, V)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


def ssr_draw(logits_BLV, uncond_BLV, scales, which, opts, generator=None):
    """Eq. (5), first half: turn the teacher-forced predictions of the scales `which` into tokens, no grad.
    With --sf-input cfg the guidance of the official trainer is used: t = cfg * (1 + i/(K-1)) / 2,
    logits = (1+t) * cond - t * uncond (note: inference ramps t differently, see sample())."""
    K, be, drawn = len(scales), begin_ends(scales), {}
    for i in which:
        a, b = be[i]
        lg = logits_BLV[:, a:b]
        if opts.sf_input == 'argmax':
            drawn[i] = lg.argmax(-1)
            continue
        if opts.sf_input == 'cfg':
            t = opts.sf_cfg * 0.5 * (1 + i / (K - 1))
            lg = (1 + t) * lg - t * uncond_BLV[:, a:b]
        drawn[i] = sample_top_k_top_p(lg, opts.sf_top_k, opts.sf_top_p, generator)
    return drawn


def student_pass(model, vae, labels, drawn, scales, transitions):
    """Eq. (5) second half and eq. (6): upsample the drawn tokens to the next scale and run pass 2.
    Returns student logits (B, N, V) and the list of scale indices they predict (in order)."""
    K = len(scales)
    if transitions == 'last':
        # Official: one transition k -> k+1 with k = K-2. Context = class token (no pos_start) + the input,
        # i.e. the "scale list" [1, pn_{k+1}]; the coarser history is not in the context (Algorithm 1, line 23).
        k, pn = K - 2, scales[K - 1]
        u = vae.upsample(vae.embed(drawn[k], scales[k]), pn).flatten(2).transpose(1, 2)   # (B, pn^2, Cv)
        return model(labels, u, [1, pn], first_pos=False)[:, 1:], [K - 1]
    # 'all' (eq. 6/8): every scale's input is built from the teacher prediction of the scale before,
    # one pass over the whole shifted sequence with the same block-causal mask.
    x_sf = vae.tf_input([drawn[i] for i in range(K)], scales)
    return model(labels, x_sf, scales)[:, scales[0] ** 2:], list(range(1, K))


def compute_losses(model, vae, gt_idx, x_in, labels, scales, opts, generator=None, raw_model=None, step=0):
    """One training step's losses. mode 'tf': eq. (2). mode 'sar': eq. (11) = L_TF (eq. 9) + gamma * L_CSF (eq. 10).
    mode 'sf': eq. (3), the same cross entropy on inputs from the model's own rollout (section 4.1).
    `model` may be the DDP wrapper (used for the passes that get gradients); `raw_model` is the bare module,
    used for the no-grad passes. Returns (loss, info dict)."""
    raw_model = raw_model or model
    num_classes = raw_model.num_classes
    target = torch.cat(gt_idx, dim=1)                                     # (B, L)
    if opts.mode == 'sf' and not (opts.sf_schedule == 'alternate' and step % 2 == 0):
        x_in = naive_sf_inputs(raw_model, vae, gt_idx, labels, scales, opts, generator)
    lab = drop_labels(labels, opts.cond_drop, num_classes, generator)
    logits = model(lab, x_in, scales)                                     # pass 1, eq. (4): (B, L, V)
    loss_tf = token_ce(logits, target, opts.label_smoothing)              # eq. (9)
    info = dict(loss_tf=loss_tf.detach(), logits=logits.detach(), target=target)
    if opts.mode != 'sar':
        return loss_tf, info

    K = len(scales)
    which = [K - 2, K - 1] if opts.sf_transitions == 'last' else list(range(K))
    with torch.no_grad():
        uncond = None
        if opts.sf_input == 'cfg':
            # The unconditional logits are only used to *sample* inputs: a no-grad pass, outside autograd
            # (the official code runs them inside the graph as half of a doubled batch and pays for backward).
            uncond = raw_model(torch.full_like(labels, num_classes), x_in, scales)
        drawn = ssr_draw(logits.detach(), uncond, scales, which, opts, generator)
    lab_sf = drop_labels(labels, opts.cond_drop, num_classes, generator)
    sf_logits, sf_scales = student_pass(model, vae, lab_sf, drawn, scales, opts.sf_transitions)   # eq. (6)
    if opts.csf_target == 'teacher':
        csf_target = torch.cat([drawn[i] for i in sf_scales], dim=1)      # f^(T): tokens of the teacher pass
    else:
        csf_target = torch.cat([gt_idx[i] for i in sf_scales], dim=1)     # Algorithm 1, line 24
    loss_csf = token_ce(sf_logits, csf_target, opts.label_smoothing)     # eq. (10)
    info.update(loss_csf=loss_csf.detach(), sf_acc=(sf_logits.argmax(-1) == csf_target).float().mean().detach())
    return loss_tf + opts.gamma * loss_csf, info                          # eq. (11)


# ----------------------------------------------------------------------------------------------------------
# 5b. what SAR replaces: naive student forcing (section 4.1, Table 3), and the exposure-bias diagnostic (section 3)
# ----------------------------------------------------------------------------------------------------------

def naive_sf_inputs(model, vae, gt_idx, labels, scales, opts, generator=None):
    """Eq. (3): a naive student-forcing step's inputs, built from the model's own autoregressive rollout (no grad;
    K sequential passes, which is what makes naive SF slow). The input of scale i+1 is made from the token map of
    scale i, so keeping map i at the ground truth teacher-forces scale i+1. Schedules (Table 3):
    full (and the SF steps of alternate): no map kept; interleave: 1-based odd scales teacher-forced, even ones
    student-forced; hybrid@k: scales of side <= k teacher-forced, finer ones student-forced. (B, L - pn_1^2, Cv)"""
    K = len(scales)
    if opts.sf_schedule == 'interleave':
        keep = [i for i in range(K - 1) if i % 2 == 1]     # map i feeds 1-based scale i+2
    elif opts.sf_schedule == 'hybrid':
        keep = [i for i in range(K - 1) if scales[i + 1] <= opts.sf_hybrid_k]
    else:
        keep = []
    top_k = 1 if opts.sf_input == 'argmax' else opts.sf_top_k
    cfg = opts.sf_cfg if opts.sf_input == 'cfg' else None
    own, _ = generate_tokens(model, vae, labels, scales, cfg, top_k, opts.sf_top_p, generator, official_grid=False,
                             force={i: gt_idx[i] for i in keep})
    return vae.tf_input(own, scales)


@torch.no_grad()
def exposure_bias(model, vae, gt_idx, labels, scales, input_idx):
    """Section 3's train-test gap, per scale: {pn: (CE, accuracy)} against the ground-truth tokens when every
    scale's input is built from the token maps `input_idx` (the GT maps: teacher forcing, eq. 2; the model's own
    maps: what it sees at inference)."""
    logits = model(labels, vae.tf_input(input_idx, scales), scales)        # (B, L, V)
    return per_scale_stats(logits, torch.cat(gt_idx, dim=1), scales)


# ----------------------------------------------------------------------------------------------------------
# 6. the training loop: one code path for 1 process and torchrun DDP
# ----------------------------------------------------------------------------------------------------------

def setup_distributed(device_arg):
    """Returns (rank, world, device). Under torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    import torch.distributed as dist
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank, local = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    device = pick_device(device_arg)
    if device.type == 'cuda':
        device = torch.device('cuda', local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def pick_device(name='auto'):
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def ensure_writable(out_dir, rank=0):
    """Create `out_dir` and prove it is writable before any work is done (not after an hour of training)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f'.write_test{rank}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {out_dir}: {e.strerror}")
    return out_dir


def step_seed(seed, step, rank=0):
    """All randomness of optimizer step `step` derives from (seed, step, rank): data order, scale list, flips,
    class dropout, drop-path, SF sampling. So the step counter is the RNG state and the data position, and a
    resumed run continues exactly. The scale list uses rank 0's seed on every rank so all ranks stay in step."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2 ** 62)


def param_groups(model, weight_decay):
    """Weight decay on matrices only; not on biases, 1-D params, the position tables or the temperatures."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or 'pos_1LC' in name or 'pos_start' in name or 'scale_mul' in name
        (no_decay if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def make_optimizer(model, lr, weight_decay, device):
    groups = param_groups(model, weight_decay)
    try:  # the fused kernel is a single pass over all parameters (CUDA, and CPU in recent torch)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step, total, peak, warmup, end_frac, hold_frac):
    """Official 'lin0' schedule: linear warm-up from 0.5% of peak, hold the peak for hold_frac of the rest,
    then linear decay to end_frac * peak at the last step."""
    if step < warmup:
        return peak * (0.005 + 0.995 * step / warmup)
    rest = max(1, total - warmup)
    t = (step - warmup) / rest
    if t <= hold_frac:
        return peak
    return peak * (1 - (1 - end_frac) * min(1.0, (t - hold_frac) / max(1e-8, 1 - hold_frac)))


class StepBatches(torch.utils.data.Sampler):
    """Yields this rank's index lists for every (step, micro-step) from `start_step`: the global batch of step s
    is a slice of a seeded permutation of the dataset (one per epoch), and rank r takes its share of it.
    Deterministic and position-addressable, so resuming needs no sampler state."""

    def __init__(self, n, global_batch, micro, world, rank, accum, start_step, total_steps, seed):
        self.n, self.g, self.micro, self.world, self.rank = n, global_batch, micro, world, rank
        self.accum, self.start, self.total, self.seed = accum, start_step, total_steps, seed
        self.per_epoch = n // global_batch

    def __iter__(self):
        perm, perm_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, pos = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                perm_epoch = epoch
            batch = perm[pos * self.g:(pos + 1) * self.g]
            for m in range(self.accum):  # micro-batch m of rank r: the slice (m * world + r)
                j = (m * self.world + self.rank) * self.micro
                yield batch[j:j + self.micro].tolist()

    def __len__(self):
        return (self.total - self.start) * self.accum


def build_model(args, vae, device):
    """Create the transformer (from --init, --resume or scratch). Returns (model, ckpt_or_None)."""
    cfg = dict(depth=args.depth, vocab_size=vae.codebook().shape[0], num_classes=args.num_classes,
               codebook_dim=vae.codebook().shape[1])
    model = FlexVAR(**cfg, drop_path_rate=args.drop_path).init_weights(init_adaln_gamma=args.init_gamma)
    if args.init:
        sd = extract_state_dict(load_ckpt_file(args.init, args.trust_checkpoint))
        have = config_from_state_dict(sd)
        if have['depth'] != args.depth:
            raise UserError(f"--init {args.init} holds a depth-{have['depth']} model but --depth is {args.depth}; "
                            f"pass --depth {have['depth']}")
        load_state_dict_strict(model, sd, f"--init {args.init}")
    return model.to(device)


def load_ckpt_file(path, trust=False):
    from tokenizer import load_checkpoint
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return load_checkpoint(path, trust=trust)
    except UserError:
        raise
    except Exception as e:  # tokenizer.load_checkpoint explains weights_only refusals; keep it to one line
        raise UserError(f"cannot load {path}: {str(e).splitlines()[0]}")


def load_vae(path, device, trust=False):
    from tokenizer import load_tokenizer
    if not os.path.isfile(path):
        hint = " (make it with: python tokenizer.py)" if path == DEFAULT_VAE else ""
        raise UserError(f"tokenizer checkpoint not found: {path}{hint}")
    try:
        vae = load_tokenizer(path, device=device, trust=trust)
    except Exception as e:
        raise UserError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}")
    return nhwc(vae, device)


def nhwc(vae, device):
    """Channels-last convolutions: oneDNN (CPU) and cuDNN run them faster; the d16 benchmark's 256 px encode
    of 2 images went from 2.00 s to 1.75 s on the 2-core CPU. Same results up to float rounding."""
    return vae.to(memory_format=torch.channels_last) if device.type in ('cpu', 'cuda') else vae


def autocast_ctx(device, dtype_name):
    if dtype_name == 'fp32' or (dtype_name == 'auto' and device.type != 'cuda'):
        return nullcontext()
    dtype = torch.float16 if dtype_name == 'fp16' else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_backward(fwd, raw, vae, images, labels, scales, args, gen, scaler=None, step=0):
    """Tokenize (frozen VAE), compute the mode's loss under autocast, backward (scaled by 1/grad_accum)."""
    gt_idx, x_in = gt_tokens_and_inputs(vae, images, scales)
    with autocast_ctx(images.device, args.dtype):
        loss, info = compute_losses(fwd, vae, gt_idx, x_in, labels, scales, args, gen, raw_model=raw, step=step)
    scaled = loss / args.grad_accum
    (scaler.scale(scaled) if scaler else scaled).backward()
    return loss, info


def train(args):
    import torch.distributed as dist
    from tokenizer import load_dataset, save_atomic
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    out_dir = args.out_dir or os.path.join('out', args.mode)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if master:
        ensure_writable(out_dir)
    if args.batch_size % (world * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} (global) must be divisible by the number of processes "
                        f"({world}) x --grad-accum ({args.grad_accum})")
    micro = args.batch_size // (world * args.grad_accum)
    torch.manual_seed(args.seed)

    # ---- data and tokenizer (frozen, eval) ----
    args.vae = args.vae or DEFAULT_VAE
    vae = load_vae(args.vae, device, args.trust_checkpoint)
    latent = args.image_size // vae.downsample
    check_scales(args.scales, latent)
    try:
        data = load_dataset(args.data, args.image_size, split='train', seed=args.data_seed)
    except Exception as e:
        raise UserError(str(e).splitlines()[0])
    if len(data) < args.batch_size:
        raise UserError(f"dataset {args.data} has {len(data)} images, fewer than one batch ({args.batch_size})")
    args.num_classes = args.num_classes or data.num_classes

    # ---- model, optimizer, resume ----
    model = build_model(args, vae, device)
    raw = model
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2. ** 11, growth_interval=1000) if args.dtype == 'fp16' else None
    step = 0
    if args.resume and os.path.isfile(ckpt_path):
        ck = load_ckpt_file(ckpt_path, args.trust_checkpoint)
        load_state_dict_strict(raw, extract_state_dict(ck), ckpt_path)
        opt.load_state_dict(ck['optimizer'])
        if scaler is not None and ck.get('scaler'):
            scaler.load_state_dict(ck['scaler'])
        step = ck['step']
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == 'cuda' else None)
    fwd = torch.compile(model) if args.compile else model
    if master:
        print(f"model: depth {args.depth}, {count_params(raw) / 1e6:.2f}M params, V {raw.V}, classes {raw.num_classes}; "
              f"data: {args.data} ({len(data)} images); {world} process(es) x micro-batch {micro} x accum "
              f"{args.grad_accum} = {args.batch_size}; device {device}; mode {args.mode}")

    def save(at_step):
        if master:
            save_atomic(dict(model=raw.state_dict(), config=raw.config, optimizer=opt.state_dict(),
                             scaler=scaler.state_dict() if scaler else None, step=at_step,
                             args={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
                             tokenizer=os.path.abspath(args.vae), image_size=args.image_size),
                        ckpt_path)

    sampler = StepBatches(len(data), args.batch_size, micro, world, rank, args.grad_accum, step, args.steps,
                          args.data_seed)
    loader = iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=args.workers,
                                              pin_memory=device.type == 'cuda', persistent_workers=False))
    log = open(os.path.join(out_dir, 'log.jsonl'), 'a') if master else None
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, disable=not master or args.quiet, desc=args.mode, dynamic_ncols=True)
    raw.train()
    hold = 0.05 if args.mode == 'tf' else 0.0
    t0 = time.time()
    while step < args.steps:
        lr = lr_at(step, args.steps, args.lr, args.warmup_steps, args.lr_end, hold)
        for g in opt.param_groups:
            g['lr'] = lr
        gen = torch.Generator(device=device).manual_seed(step_seed(args.seed, step, rank))
        torch.manual_seed(step_seed(args.seed, step, rank))              # drop-path
        scales = (random_scales(args.scales, random.Random(step_seed(args.seed, step)))
                  if args.scale_schedule == 'random' else list(args.scales))
        totals = {}
        for m in range(args.grad_accum):
            images, labels = next(loader)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if args.flip:
                flip = torch.rand(images.shape[0], generator=gen, device=device) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            sync = world == 1 or m == args.grad_accum - 1
            with nullcontext() if sync else model.no_sync():
                loss, info = forward_backward(fwd, raw, vae, images, labels, scales, args, gen, scaler, step)
            for k in ('loss_tf', 'loss_csf', 'sf_acc'):
                if k in info:
                    totals[k] = totals.get(k, 0.0) + info[k].float() / args.grad_accum
            totals['loss'] = totals.get('loss', 0.0) + loss.detach().float() / args.grad_accum
        if scaler:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        stats = torch.stack([totals['loss'], grad_norm.float()])
        if world > 1:
            dist.all_reduce(stats)
            stats /= world
        if not torch.isfinite(stats).all():
            bar.close()
            raise UserError(f"loss {stats[0].item()} / grad norm {stats[1].item()} at step {step}: stopped; the last good checkpoint "
                            f"({ckpt_path if os.path.isfile(ckpt_path) else 'none yet'}) is untouched. Try a lower "
                            f"--lr, --dtype bf16/fp32 instead of fp16, or check the data")
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if master and (step % args.log_every == 0 or step == args.steps):
            rec = dict(step=step, lr=lr, loss=stats[0].item(), grad_norm=stats[1].item(),
                       scales=scales, imgs_per_s=args.log_every * args.batch_size / (time.time() - t0))
            rec.update({k: totals[k].item() for k in ('loss_tf', 'loss_csf', 'sf_acc') if k in totals})
            rec['per_scale'] = {str(pn): dict(ce=round(ce, 4), acc=round(acc, 4))
                                for pn, (ce, acc) in per_scale_stats(info['logits'], info['target'], scales).items()}
            log.write(json.dumps(rec) + '\n')
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", **({'csf': f"{rec['loss_csf']:.3f}"} if 'loss_csf' in rec else {}))
            if args.quiet or not sys.stderr.isatty():
                print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items()
                                  if k != 'per_scale'}), flush=True)
            t0 = time.time()
        if step % args.ckpt_every == 0 or step == args.steps or step == args.stop_at:
            save(step)
        if step == args.stop_at:
            break
    bar.close()
    if log:
        log.close()
    if world > 1:
        dist.barrier()
    if master:
        print(f"done: {step} steps; checkpoint {ckpt_path}")
    return raw


# ----------------------------------------------------------------------------------------------------------
# 7. sampling: KV cache, classifier-free guidance
# ----------------------------------------------------------------------------------------------------------

# The official sampler only samples at the side lengths the released models were trained on; at any other
# scale (or above max_pn) it is greedy (top_k forced to 1). Kept for faithful sampling of official checkpoints.
OFFICIAL_SAMPLING_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32)


def cfg_combine(cond, uncond, si, K, cfg, form, pn, max_pn=16):
    """Classifier-free guidance at scale index si of K.
    'var' (official eval default): t = cfg * si / min(K-1, 9) (cfg beyond max_pn), logits = (1+t) c - t u,
        so guidance ramps from none at the first scale to 1+cfg at the 10th.
    'llamagen' (constant): logits = u + cfg * (c - u)."""
    if form == 'llamagen':
        return uncond + cfg * (cond - uncond)
    t = cfg * si / min(K - 1, 9) if pn <= max_pn else cfg
    return (1 + t) * cond - t * uncond


@torch.no_grad()
def generate_tokens(model, vae, labels, scales, cfg=1.5, top_k=0, top_p=0.0, generator=None, cfg_form='var',
                    max_pn=16, official_grid=True, force=None):
    """The autoregressive rollout: generate token maps for `labels` (B,) scale by scale with a KV cache. Each step
    feeds only the new scale's B*pn^2 tokens; keys/values of the coarser scales come from the cache (so no mask
    is needed: a scale may see everything computed before it, which is exactly the block-causal rule).
    The conditional and unconditional rows run as one 2B batch; cfg=None runs the conditional rows alone (no guidance).
    force: optional {scale index: (B, pn^2) tokens} that replace the drawn tokens there (the naive student-forcing
    schedules keep the ground truth at some scales). Returns (tokens, logits): per-scale lists."""
    was_training = model.training
    model.eval()
    B, K, nc = labels.shape[0], len(scales), model.num_classes
    rows = labels if cfg is None else torch.cat((labels, torch.full_like(labels, nc)))
    R = rows.shape[0]
    cond_BC = model.class_emb(rows)                                                    # (R, C), R = 2B or B
    first_l = scales[0] ** 2
    x = cond_BC[:, None, :].expand(-1, first_l, -1) + model.pos_start.expand(R, first_l, -1) \
        + model.pos_embed(scales[:1])
    caches = [dict() for _ in model.blocks]
    all_idx, all_logits = [], []
    for si, pn in enumerate(scales):
        h = x
        for block, cache in zip(model.blocks, caches):
            h = block(h, cond_BC, None, cache)
        logits = model.logits(h, cond_BC)                                              # (R, pn^2, V)
        if cfg is not None:
            logits = cfg_combine(logits[:B], logits[B:], si, K, cfg, cfg_form, pn, max_pn)
        k = top_k if not official_grid or (pn <= max_pn and pn in OFFICIAL_SAMPLING_GRID) else 1
        idx = sample_top_k_top_p(logits, k, top_p, generator)                         # (B, pn^2)
        if force is not None and si in force:
            idx = force[si]
        all_idx.append(idx)
        all_logits.append(logits)
        if si + 1 < K:  # the next input: this scale's codebook vectors, upsampled (exactly as in training)
            nxt = scales[si + 1]
            f = vae.upsample(vae.embed(idx, pn), nxt).flatten(2).transpose(1, 2)      # (B, nxt^2, Cv)
            x = (model.word_embed(f.float()) + model.pos_embed([nxt])).repeat(R // B, 1, 1)
    model.train(was_training)
    return all_idx, all_logits


@torch.no_grad()
def sample(model, vae, labels, scales, cfg=1.5, top_k=0, top_p=0.0, generator=None, cfg_form='var',
           max_pn=16, official_grid=True, trajectory=False, return_logits=False):
    """Generate images for `labels` (B,): the rollout above, then decode the finest token map.
    Returns images (B, 3, H, W) in [-1, 1] (and the per-scale decoded images if trajectory, and the per-scale
    guided logits and tokens if return_logits)."""
    idx, logits = generate_tokens(model, vae, labels, scales, cfg, top_k, top_p, generator, cfg_form, max_pn,
                                  official_grid)
    out = (vae.decode_code(idx[-1], scales[-1]),)   # nominally [-1, 1]; clamped when saved
    if trajectory:
        out += ([vae.decode_code(t, pn) for t, pn in zip(idx, scales)],)
    if return_logits:
        out += (logits, idx)
    return out[0] if len(out) == 1 else out


def sampling_setup(args, device):
    """Load the checkpoint and its tokenizer, and resolve the sampling defaults. Returns (model, vae, scales)."""
    if not args.ckpt:
        raise UserError("--sample needs --ckpt CKPT (e.g. out/sar/ckpt.pt)")
    ck = load_ckpt_file(args.ckpt, args.trust_checkpoint)
    sd = extract_state_dict(ck)
    model = FlexVAR(**config_from_state_dict(sd))
    load_state_dict_strict(model, sd, args.ckpt)
    ours = isinstance(ck.get('args'), dict)
    vae_path = args.vae or (ck.get('tokenizer') if ours else None)
    if not vae_path:
        raise UserError(f"{args.ckpt} names no tokenizer: pass --vae (the official FlexVAE.pth for official checkpoints)")
    vae = load_vae(vae_path, device, args.trust_checkpoint)
    if vae.codebook().shape != (model.V, model.config['codebook_dim']):
        raise UserError(f"tokenizer {vae_path} has a {tuple(vae.codebook().shape)} codebook but the model expects "
                        f"({model.V}, {model.config['codebook_dim']})")
    scales = args.sample_scales or (ck['args']['scales'] if ours else list(OFFICIAL_SCALES))
    if args.cfg is None:  # official eval settings for official checkpoints (spec section 4)
        args.cfg = {16: 2.2, 20: 2.6, 24: 3.3}.get(model.depth, 1.5) if not ours else 1.5
    return model.to(device).eval(), vae, scales


def npy_header(shape):
    """The .npy header of a C-ordered uint8 array of `shape` (so the data can be streamed after it)."""
    import numpy as np
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, dict(descr='|u1', fortran_order=False, shape=tuple(shape)))
    return buf.getvalue()


class NpzStream:
    """Write an .npz with `arr_0` (N, H, W, 3) uint8 and `labels` (N,) chunk by chunk: 50,000 images at 256 px
    (9.8 GB) never sit in memory. Written to a temporary name, renamed when complete."""

    def __init__(self, path, n, h, w):
        import zipfile
        self.path, self.tmp, self.n, self.labels = path, path + '.tmp', n, []
        self.zf = zipfile.ZipFile(self.tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True)
        self.f = self.zf.open('arr_0.npy', 'w', force_zip64=True)
        self.f.write(npy_header((n, h, w, 3)))

    def write(self, images_uint8_NHWC, labels):
        self.f.write(images_uint8_NHWC.tobytes())
        self.labels.extend(int(x) for x in labels)

    def close(self):
        import numpy as np
        import io
        self.f.close()
        buf = io.BytesIO()
        np.save(buf, np.asarray(self.labels, dtype=np.int64))
        self.zf.writestr('labels.npy', buf.getvalue())
        self.zf.close()
        if len(self.labels) != self.n:
            raise RuntimeError(f"npz stream got {len(self.labels)} images, expected {self.n}")
        os.replace(self.tmp, self.path)


def to_uint8_nhwc(images):
    """(B, 3, H, W) in [-1, 1] -> numpy uint8 (B, H, W, 3), rounding like torchvision's save_image."""
    return ((images.clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def run_sampling(args):
    """--sample: generate --num-samples images per class; grid PNG, optional per-image PNGs and streamed .npz.
    Every batch b has its own generator seeded from (--seed, b), so the images do not depend on the number of
    processes: under torchrun rank r takes batches r, r+world, ..., and rank 0 merges the shards in order."""
    import numpy as np
    import torch.distributed as dist
    from tokenizer import save_image_grid
    from PIL import Image
    rank, world, device = setup_distributed(args.device)
    model, vae, scales = sampling_setup(args, device)
    nc = model.num_classes
    if args.classes == 'all':
        classes = list(range(nc))
    else:
        try:
            classes = [int(c) for c in args.classes.split(',') if c.strip()]
        except ValueError:
            raise UserError(f"--classes must be 'all' or comma-separated integers, got {args.classes!r}")
        bad = [c for c in classes if not 0 <= c < nc]
        if bad:
            raise UserError(f"class id(s) {bad} out of range: this model has classes 0..{nc - 1}")
    out_dir = ensure_writable(args.out_dir or os.path.dirname(os.path.abspath(args.ckpt)), rank)
    labels = torch.tensor([c for c in classes for _ in range(args.num_samples)], dtype=torch.long)
    n, bs = len(labels), args.sample_batch
    batches = list(range(rank, (n + bs - 1) // bs, world))
    side = scales[-1] * vae.downsample
    top_k = min(args.top_k, model.V)
    shard = np.lib.format.open_memmap(os.path.join(out_dir, f'.shard{rank}.npy'), mode='w+', dtype=np.uint8,
                                      shape=(max(1, len(batches) * bs), side, side, 3)) if args.save_npz else None
    from tqdm import tqdm
    grid, traj = [], None
    for j, b in enumerate(tqdm(batches, disable=rank != 0 or args.quiet, desc='sampling')):
        lab = labels[b * bs:(b + 1) * bs].to(device)
        gen = torch.Generator(device=device).manual_seed(step_seed(args.seed, b))
        with autocast_ctx(device, args.dtype):
            out = sample(model, vae, lab, scales, args.cfg, top_k, args.top_p, gen, args.cfg_form,
                         trajectory=args.trajectory and b == 0)
        images, steps = (out if args.trajectory and b == 0 else (out, None))
        u8 = to_uint8_nhwc(images.float())
        if steps is not None:
            traj = torch.stack([F.interpolate(s.float(), size=(side, side), mode='nearest') for s in steps], 1)
        if shard is not None:
            shard[j * bs:j * bs + len(lab)] = u8
        if args.save_png:
            for i, (img, c) in enumerate(zip(u8, lab.tolist())):
                os.makedirs(os.path.join(out_dir, 'samples', str(c)), exist_ok=True)
                Image.fromarray(img).save(os.path.join(out_dir, 'samples', str(c), f'{b * bs + i:06d}.png'))
        grid.append(images.float().cpu())
    if shard is not None:
        shard.flush()
    if world > 1:
        dist.barrier()
    if rank != 0:
        return
    per_class = min(args.num_samples, 10)
    shown = torch.cat(grid)[:n] if world == 1 else None
    if shown is not None:  # grid: up to 10 classes x up to 10 samples each, one row per class
        keep = [i for i, c in enumerate(labels.tolist()) if classes.index(c) < 10 and i % args.num_samples < per_class]
        save_image_grid(shown[keep].clamp(-1, 1), os.path.join(out_dir, 'samples.png'), nrow=per_class)
        print(f"wrote {os.path.join(out_dir, 'samples.png')}")
    if traj is not None:  # rows: samples; columns: the image decoded after each scale (paper Fig. 7)
        t = traj[:8].clamp(-1, 1)
        save_image_grid(t.flatten(0, 1).cpu(), os.path.join(out_dir, 'trajectory.png'), nrow=len(scales))
        print(f"wrote {os.path.join(out_dir, 'trajectory.png')}")
    if args.save_npz:
        shards = [np.load(os.path.join(out_dir, f'.shard{r}.npy'), mmap_mode='r') for r in range(world)]
        w = NpzStream(args.save_npz, n, side, side)
        for b in range((n + bs - 1) // bs):
            r, j = b % world, b // world
            count = min(bs, n - b * bs)
            w.write(np.ascontiguousarray(shards[r][j * bs:j * bs + count]), labels[b * bs:b * bs + count].tolist())
        w.close()
        for r in range(world):
            os.remove(os.path.join(out_dir, f'.shard{r}.npy'))
        print(f"wrote {args.save_npz} ({n} images, {side}x{side})")


# ----------------------------------------------------------------------------------------------------------
# benchmark: time training steps
# ----------------------------------------------------------------------------------------------------------

def train_flops_per_image(model, scales, opts):
    """Matmul FLOPs of one training image: forward = 2 * (weights x tokens) + attention 4 * L_ctx * C per token
    per layer; backward = 2x forward. SAR adds the no-grad uncond pass (cfg) and the student pass."""
    C, D, V = model.C, model.depth, model.V

    def fwd(scales_):
        L = sum(pn * pn for pn in scales_)
        ctx = sum(pn * pn * sum(q * q for q in scales_[:i + 1]) for i, pn in enumerate(scales_))
        return 2 * L * (D * 12 * C * C + C * V) + 4 * ctx * C * D
    total = 3 * fwd(scales)
    if opts.mode == 'sar':
        if opts.sf_input == 'cfg':
            total += fwd(scales)
        total += 3 * (fwd([1, scales[-1]]) if opts.sf_transitions == 'last' else fwd(scales))
    return total


def bench(args):
    import statistics
    from tokenizer import VQVAE
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if args.vae:
        vae = load_vae(args.vae, device, args.trust_checkpoint)
    else:  # the real FlexVAE architecture with random weights (costs the same as the trained one)
        vae = nhwc(VQVAE().to(device).eval().requires_grad_(False), device)
    size = args.scales[-1] * vae.downsample
    V, Cv = vae.codebook().shape
    model = FlexVAR(args.depth, V, args.num_classes or 1000, Cv).init_weights().to(device).train()
    args.sf_top_k = min(args.sf_top_k, V)
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type) if args.dtype == 'fp16' else None
    fwd = torch.compile(model) if args.compile else model
    B, scales = args.batch_size, list(args.scales)
    images = torch.rand(B, 3, size, size, device=device) * 2 - 1
    labels = torch.randint(0, model.num_classes, (B,), device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.bench_steps):
        gen = torch.Generator(device=device).manual_seed(i)
        sync()
        t = time.perf_counter()
        forward_backward(fwd, model, vae, images, labels, scales, args, gen, scaler, step=1)
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        (scaler.step(opt), scaler.update()) if scaler else opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        print(f"step {i}: {times[-1] * 1000:.1f} ms{' (warm-up)' if i == 0 else ''}", flush=True)
    med = statistics.median(times[1:] if len(times) > 1 else times)
    L = sum(pn * pn for pn in scales)
    parts = bench_sar_parts(model, vae, images, labels, scales, args, sync) if args.mode == 'sar' else {}
    res = dict(depth=args.depth, params_M=round(count_params(model) / 1e6, 2), batch=B, mode=args.mode,
               sf_input=args.sf_input if args.mode == 'sar' else None, scales=scales, device=str(device),
               dtype=args.dtype, ms_per_step=round(med * 1000, 1), min_ms=round(min(times[1:] or times) * 1000, 1),
               images_per_s=round(B / med, 2), tokens_per_s=round(B * L / med, 1), **parts)
    if device.type == 'cuda':
        res['peak_mem_GiB'] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        res['mfu'] = round(train_flops_per_image(model, scales, args) * B / med / (args.peak_tflops * 1e12), 4)
    else:
        import resource
        res['peak_rss_GiB'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    print(json.dumps(res))
    return res


def bench_sar_parts(model, vae, images, labels, scales, args, sync, reps=3):
    """SAR's extra work timed alone (median of `reps`), for the floor of a SAR step:
    TF step + student pass (fwd + bwd) [+ one no-grad conditional-free forward when --sf-input cfg]."""
    import statistics
    gt_idx, x_in = gt_tokens_and_inputs(vae, images, scales)
    drawn = {i: t for i, t in enumerate(gt_idx)}     # stand-in tokens: the cost does not depend on their values

    def timed(fn):
        ts = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            with autocast_ctx(images.device, args.dtype):
                fn()
            sync()
            ts.append(time.perf_counter() - t)
        return round(statistics.median(ts) * 1000, 1)

    def student():
        sf_logits, _ = student_pass(model, vae, labels, drawn, scales, args.sf_transitions)
        sf_logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        uncond_ms = timed(lambda: model(torch.full_like(labels, model.num_classes), x_in, scales))
    return dict(student_pass_ms=timed(student), nograd_forward_ms=uncond_ms)


# ----------------------------------------------------------------------------------------------------------
# the exposure-bias diagnostic (section 3) as a command
# ----------------------------------------------------------------------------------------------------------

def run_diagnose(args):
    """--diagnose: the exposure-bias diagnostic (section 3) of --ckpt on held-out images, per scale, for three
    kinds of inputs: teacher (the GT token maps: training, eq. 2); ssr (each map drawn from the model's own
    teacher-forced prediction as --sf-input says: the inputs SAR's 'all' transitions train on, eq. 5); rollout (the
    model's free-running generation with the sampling flags: what inference sees). Targets are always the GT
    tokens, so teacher -> rollout is the train-test gap."""
    from tokenizer import load_dataset
    device = pick_device(args.device)
    model, vae, scales = sampling_setup(args, device)
    out_dir = ensure_writable(args.out_dir or os.path.dirname(os.path.abspath(args.ckpt)))
    data = load_dataset(args.data, scales[-1] * vae.downsample, 'val', flip=False, seed=args.data_seed)
    n = min(args.diag_images, len(data))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(n)), batch_size=args.sample_batch)
    args.sf_top_k, top_k, K = min(args.sf_top_k, model.V), min(args.top_k, model.V), len(scales)
    sums = {kind: {pn: [0.0, 0.0] for pn in scales} for kind in ('teacher', 'ssr', 'rollout')}
    from tqdm import tqdm
    for b, (images, labels) in enumerate(tqdm(loader, disable=args.quiet, desc='diagnose')):
        images, labels = images.to(device), labels.to(device)
        gen = torch.Generator(device=device).manual_seed(step_seed(args.seed, b))
        with torch.no_grad(), autocast_ctx(device, args.dtype):
            gt_idx, x_in = gt_tokens_and_inputs(vae, images, scales)
            logits = model(labels, x_in, scales)
            uncond = model(torch.full_like(labels, model.num_classes), x_in, scales) if args.sf_input == 'cfg' else None
            drawn = ssr_draw(logits, uncond, scales, range(K), args, gen)
            own, _ = generate_tokens(model, vae, labels, scales, args.cfg, top_k, args.top_p, gen, args.cfg_form)
            stats = dict(teacher=per_scale_stats(logits, torch.cat(gt_idx, dim=1), scales),   # = exposure_bias(gt_idx)
                         ssr=exposure_bias(model, vae, gt_idx, labels, scales, [drawn[i] for i in range(K)]),
                         rollout=exposure_bias(model, vae, gt_idx, labels, scales, own))
            for kind, per in stats.items():
                for pn, (ce, acc) in per.items():
                    sums[kind][pn][0] += ce * len(labels)
                    sums[kind][pn][1] += acc * len(labels)
    L = sum(pn * pn for pn in scales)
    res = dict(ckpt=os.path.abspath(args.ckpt), images=n, scales=scales, cfg=args.cfg, top_k=top_k, top_p=args.top_p,
               sf_input=args.sf_input, per_scale={}, token_mean_ce={})
    for kind, d in sums.items():
        res['per_scale'][kind] = {str(pn): dict(ce=round(c / n, 4), acc=round(a / n, 4)) for pn, (c, a) in d.items()}
        res['token_mean_ce'][kind] = round(sum(d[pn][0] / n * pn * pn for pn in scales) / L, 4)
    print(f"exposure bias of {args.ckpt} on {n} held-out images (CE / accuracy vs the GT tokens)")
    print(f"{'scale':>5} | {'teacher':>15} | {'ssr':>15} | {'rollout':>15}")
    for pn in scales:
        print(f"{pn:>5} | " + " | ".join(f"{res['per_scale'][k][str(pn)]['ce']:7.3f} {res['per_scale'][k][str(pn)]['acc']:6.1%}"
                                        for k in sums))
    print(f"{'mean':>5} | " + " | ".join(f"{res['token_mean_ce'][k]:7.3f} {'':6}" for k in sums))
    from tokenizer import atomic_write
    atomic_write(os.path.join(out_dir, 'diagnose.json'), lambda f: f.write(json.dumps(res, indent=1).encode()))
    print(f"wrote {os.path.join(out_dir, 'diagnose.json')}")
    return res


# ----------------------------------------------------------------------------------------------------------
# 8. main
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_parser().parse_args(argv)
    from tokenizer import DataError
    try:
        args = resolve_defaults(args)
        if args.sample:
            run_sampling(args)
        elif args.bench:
            bench(args)
        elif args.diagnose:
            run_diagnose(args)
        else:
            train(args)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
