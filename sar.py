"""
SAR -- Self-Autoregressive Refinement of a scale-wise autoregressive image generator, in one file.

Paper: "Rethinking Training Dynamics in Scale-wise Autoregressive Generation" (arXiv 2512.06421);
equation numbers in the comments refer to it. The generator is FlexVAR, state-dict compatible with
the official FlexVAR / SAR checkpoints; the multi-scale VQ tokenizer lives in tokenizer.py.

    python tokenizer.py                                       # tokenizer for the built-in toy data
    python sar.py --mode tf --steps 350                       # teacher forcing -> out/tf/ckpt.pt
    python sar.py --mode sar --init out/tf/ckpt.pt --steps 50 # SAR post-training -> out/sar/ckpt.pt
    python sar.py --sample --ckpt out/sar/ckpt.pt             # -> out/sar/samples.png, a row/class
    torchrun --standalone --nproc_per_node 8 sar.py --mode sar --depth 16 --data /imagenet/train ...

Read top to bottom, the file follows the method: 1-2. the transformer and its block-causal mask (eq.
1); 3. teacher forcing (eq. 2, 4, 9); 4. SAR: SSR and CSFL (eq. 5-6, 10-11); 5. sampling; 6. the
training loop (1 process or torchrun DDP); 7. checkpoints and the sampling command; 8. the CLI.
Shapes: B batch, L tokens of a scale list, C model width, H heads, V codebook size, Cv codebook dim.
A scale list holds side lengths pn_0 < pn_1 < ...; scale i is a pn_i x pn_i token map, row-major.
"""

import argparse, functools, gc, json, math, os, random, sys, time
from collections import OrderedDict
from typing import NamedTuple
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image
from tqdm import tqdm

import cpu_speed  # CPU speed machinery, applied in one line (section 6)
from common import (ArgumentParser, UserError, atomic_write, check_ranges, check_scales,
                    check_unused, check_writable, error_line, load_checkpoint, load_state_dict_strict,
                    lr_at, parse_scales, pick_device, save_atomic, save_image_grid, step_batches,
                    step_seed, to_uint8, trim_log)
from data import load_dataset
from tokenizer import load_tokenizer

OFFICIAL_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # FlexVAR's list for 256 px output (L = 680)
LAPTOP_SCALES = (1, 2, 3, 4, 5, 6, 8)                # the laptop run (8x8 latent, L = 155)

# ---- 1. attention and the AdaLN block (VAR's blocks; names as in the official state_dict) -------
class SelfAttention(nn.Module):
    """Multi-head attention on L2-normalised q and k with a learned per-head temperature.

    Normalising q and k bounds the attention logits, which keeps fp16/bf16 training stable; the
    temperature exp(scale_mul) (initially 4, capped at 100) restores sharpness (SDPA scale=1)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer('zero_k_bias', torch.zeros(dim))  # k has no bias; stored as zeros
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask, cache=None):
        B, L, C = x.shape
        qkv = self.mat_qkv(x) + torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))  # (B, L, 3C)
        q, k, v = qkv.view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, 64)
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
        k = F.normalize(k, dim=-1)
        if cache is not None:  # sampling: the coarser scales' k/v are kept; the new scale sees all
            if 'k' in cache:
                k, v = torch.cat((cache['k'], k), dim=2), torch.cat((cache['v'], v), dim=2)
            cache['k'], cache['v'] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)  # (B, H, L, 64)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))

def drop_path(x, p, training):
    """Stochastic depth: a whole sample's residual branch is dropped, the kept ones rescaled."""
    if p == 0.0 or not training:
        return x
    return x * x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p) / (1 - p)

class AdaLNBlock(nn.Module):
    """A transformer block whose LayerNorms are modulated by the class (adaptive LayerNorm): the
    class enters every block as 6 vectors, in the official order gamma1, gamma2, scale1, scale2,
    shift1, shift2 (gamma: residual gates; scale/shift: of the attention (1) and FFN (2) branch)."""

    def __init__(self, dim, heads, drop_path_rate, eps=1e-6):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        fc1, fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.ffn = nn.Sequential(OrderedDict(fc1=fc1, act=nn.GELU(approximate='tanh'), fc2=fc2))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.drop_path_rate = drop_path_rate

    def forward(self, x, cond_BC, attn_mask, cache=None):
        ada = self.ada_lin(cond_BC).view(-1, 1, 6, x.shape[-1])
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)          # each (B, 1, C)
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

# ---- 2. the scale-wise transformer and its block-causal scale mask -------------------------------
def begin_ends(scales):
    """[(start, end)]: the token range of every scale in the flattened sequence."""
    ends = [sum(pn * pn for pn in scales[:i]) for i in range(len(scales) + 1)]
    return list(zip(ends[:-1], ends[1:]))

def block_causal_mask(scales, device=None):
    """(L, L) bool, True = may attend. Eq. (1) factorises p(f_1..f_K) over scales: a token sees its
    own scale (predicted together, in parallel) and all coarser ones, never a finer one."""
    d = torch.cat([torch.full((pn * pn,), i, device=device) for i, pn in enumerate(scales)])
    return d[:, None] >= d[None, :]

class FlexVAR(nn.Module):
    """The scale-wise AR transformer; `depth` is the one size knob: C = 64 * depth, heads = depth.

    Input for pn_0..pn_{K-1}: scale 0 is the class token (pn_0^2 copies of the class embedding
    + pos_start); scale i >= 1 holds scale i-1's code vectors upsampled to pn_i x pn_i (section 3).
    Positions: one learned 32x32 grid, area-resampled to each scale, so any scale list works."""

    def __init__(self, depth=16, vocab_size=8912, num_classes=1000, codebook_dim=32,
                 drop_path_rate=None):
        super().__init__()
        C = 64 * depth
        self.config = dict(depth=depth, vocab_size=vocab_size, num_classes=num_classes,
                           codebook_dim=codebook_dim)
        self.depth, self.C, self.V, self.num_classes = depth, C, vocab_size, num_classes
        dpr = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        self.word_embed = nn.Linear(codebook_dim, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)  # last row: the unconditional class
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, C, 32, 32))   # the learned 2-D position grid
        rates = torch.linspace(0, dpr, depth).tolist()
        self.blocks = nn.ModuleList([AdaLNBlock(C, depth, r) for r in rates])
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, vocab_size)

    def pos_embed(self, scales):
        """(1, L, C): the 32x32 grid area-pooled to every scale (pn = 1: grid mean), row-major."""
        return torch.cat([F.interpolate(self.pos_1LC, size=(pn, pn), mode='area')
                          .flatten(2).transpose(1, 2) for pn in scales], dim=1)

    def embed(self, label_B, x_BLCv, scales, first_pos=True):
        """(B, L, C) embeddings [class token(s)] + word_embed(inputs), plus positions; and cond_BC.
        first_pos=False leaves pos_start off the class token, as the official student pass does."""
        cond_BC = self.class_emb(label_B)                                           # (B, C)
        sos = cond_BC[:, None].expand(-1, scales[0] ** 2, -1) + (self.pos_start if first_pos else 0)
        x = torch.cat((sos, self.word_embed(x_BLCv.float())), dim=1) if x_BLCv is not None else sos
        return x + self.pos_embed(scales), cond_BC

    def logits(self, x_BLC, cond_BC):
        return self.head(self.head_nm(x_BLC, cond_BC)).float()

    def forward(self, label_B, x_BLCv, scales, first_pos=True):
        """label_B (B,) class ids; x_BLCv (B, L - pn_0^2, Cv) the inputs of scales 1..K-1.
        Returns logits (B, L, V) for the tokens of every scale, all scales in one parallel pass."""
        # as in the official code, the embeddings stay fp32 under autocast
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            x, cond_BC = self.embed(label_B, x_BLCv, scales, first_pos)
        mask = block_causal_mask(scales, x.device)
        for block in self.blocks:
            x = block(x, cond_BC, mask)
        return self.logits(x, cond_BC)

    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02):
        """The official initialisation (only used when training from scratch)."""
        std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias) if getattr(m, 'bias', None) is not None else None
        nn.init.trunc_normal_(self.pos_start, std=std)
        self.pos_1LC.copy_(sincos_grid(self.C))
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        for b in self.blocks:  # residual branches start small: they sum `depth` times
            b.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            b.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)        # scales and shifts
            b.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)  # the two gates start near 0
        return self

def sincos_grid(C, size=32):
    """(1, C, size, size): channel 2j sin(row * w_j), 2j+1 cos(col * w_j), w_j = 10000^(-2j/C)."""
    w = torch.exp(-torch.arange(C // 2, dtype=torch.float64) * 2 * math.log(10000.0) / C)
    ys, xs = torch.meshgrid(*[torch.arange(size, dtype=torch.float64)] * 2, indexing='ij')
    grid = torch.empty(C, size, size, dtype=torch.float64)
    grid[0::2] = torch.sin(ys[None] * w[:, None, None])
    grid[1::2] = torch.cos(xs[None] * w[:, None, None])
    return grid[None].float()

# ---- 3. teacher forcing (eq. 2, 4, 9) ------------------------------------------------------------
# Eq. (2): scale i is predicted from the *ground-truth* maps of all coarser scales. FlexVAR feeds
# them as a "scale shift": the input at scale i is the map of scale i-1, embedded with the codebook
# and bicubically upsampled to pn_i x pn_i. The block-causal mask lets scale i also see everything
# coarser, so all K predictions of eq. (4), f^(T)_i = g(f_{1:i-1}), come out of one forward pass.
def scale_shift(vae, idx, pn, nxt):
    """(B, pn^2) tokens of scale pn -> (B, nxt^2, Cv), the input of scale `nxt`: their code vectors,
    upsampled by the official bicubic resize (align_corners=False), flattened row-major."""
    f = F.interpolate(vae.embed(idx, pn), size=(nxt, nxt), mode='bicubic', align_corners=False)
    return f.flatten(2).transpose(1, 2)

def tf_input(vae, idx_list, scales):
    """The scale-shift input (B, L - pn_0^2, Cv): scale i's code vectors upsampled to scale i+1
    (i < K-1; the finest is only a target). Eq. (2) with GT maps, inference with the model's own."""
    return torch.cat([scale_shift(vae, t, a, b) for t, a, b in zip(idx_list, scales, scales[1:])], 1)

@torch.no_grad()
def gt_tokens_and_inputs(vae, images, scales):
    """The frozen tokenizer's GT maps t_i (list of (B, pn_i^2)) and their scale-shift input."""
    gt_idx = vae.tokenize(images, scales)
    return gt_idx, tf_input(vae, gt_idx, scales)

def drop_labels(labels, p, num_classes, generator=None):
    """Class dropout: a sample goes unconditional with probability p (trains the model CFG uses)."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)

def token_ce(logits_BLV, target_BL):
    """Token-mean cross entropy: the official loss weighs every token 1/L (no per-scale weights)."""
    return F.cross_entropy(logits_BLV.flatten(0, 1).float(), target_BL.flatten())

def tf_loss(model, gt_idx, x_in, labels, scales, gen=None, *, num_classes, cond_drop=0.1):
    """Eq. (9): L_TF, cross entropy of the teacher-forced predictions (one pass, eq. 4) vs the GT.
    Returns (loss, info); info keeps the (detached) logits, from which SAR draws its rollout."""
    logits = model(drop_labels(labels, cond_drop, num_classes, gen), x_in, scales)  # (B, L, V)
    loss = token_ce(logits, torch.cat(gt_idx, dim=1))                              # targets (B, L)
    return loss, dict(loss_tf=loss.detach(), logits=logits.detach())

def random_scales(default_scales, rng):
    """A new random scale list every step, so that any list works at inference; for 1,2,...,13,16
    exactly FlexVAR's: with p 0.05 the full list, else [1, 2] + 5 sides from 3..10 + 2 from 11..15 +
    [16]; then sometimes up to four middle scales are dropped, then ones among the last four until
    the list fits the token budget (680). Other finest scales scale the recipe."""
    final, budget = default_scales[-1], sum(pn * pn for pn in default_scales)
    if rng.random() < 0.05:
        scales = list(default_scales)
    else:
        split = round(final * 10 / 16)
        lo, hi = list(range(3, split + 1)), list(range(split + 1, final))
        head = [pn for pn in (1, 2) if pn < final]
        scales = head + sorted(rng.sample(lo, min(5, len(lo))) + rng.sample(hi, min(2, len(hi)))) + [final]
    u = rng.random()
    for threshold in (0.9, 0.95, 0.98, 0.99):
        if u > threshold and len(scales) > 4:
            scales.pop(rng.randint(2, len(scales) - 2))
    # never the first scale, never below two: [first, any side <= final] always fits the budget
    while sum(pn * pn for pn in scales) > budget and len(scales) > 2:
        scales.pop(rng.randint(max(1, len(scales) - 4), len(scales) - 1))
    return scales

# ---- 4. SAR: Stagger-Scale Rollout (eq. 5-6) and Contrastive Student-Forcing Loss (eq. 10-11) --
# At inference the model consumes its *own* coarser maps, which teacher forcing never showed it
# (exposure bias, section 3). SSR shows them to it at the cost of one extra forward pass:
#   pass 1 = teacher forcing (above). Its predictions become tokens without gradient (argmax, or
#            sampling with/without CFG), embedded and upsampled to the next scale (eq. 5): the
#            model's own output, shaped exactly like an inference input;
#   pass 2 = the model again on those inputs: the one-step student-forced predictions f^(S) (eq. 6).
# CSFL (eq. 10) pulls f^(S) towards the teacher-forced prediction, not the ground truth: the
# student's input has drifted from the GT hierarchy, so the GT would be a contradictory target (why
# naive student forcing fails, section 4.1). Paper vs official code (defaults: the official runs):
#   transitions 'last' (official): one transition per step, the last pair k = K-2 -> K-1 of the
#       step's random list, context [class token, upsampled tokens]; 'all' (eq. 6/8): all at once;
#   target 'teacher' (eq. 10, official): tokens drawn from pass 1; 'gt': Algorithm 1 line 24;
#   sf_input 'cfg' (official trainer defaults, never overridden by the official train.py): sampled
#       with CFG 1.2 (ramped), top-k 900, top-p 0.96; 'argmax': Algorithm 1; 'sample': unguided.

class SFDraw(NamedTuple):
    """How pass 1's predictions become the student's input tokens (official trainer defaults)."""
    input: str = 'cfg'  # 'argmax' (Algorithm 1), 'sample' (unguided) or 'cfg' (guided sampling)
    top_k: int = 900
    top_p: float = 0.96
    cfg: float = 1.2    # ramped over the scales; at cfg <= 1 the official code samples unguided

def uniform(shape, generator, device):
    """Uniform [0, 1) numbers from one generator, or row b from generator[b] (the sampler passes one
    per image: its draws then depend neither on its batch nor on the processes)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator])
    return torch.rand(shape, generator=generator, device=device)

def sample_top_k_top_p(logits, top_k=0, top_p=0.0, generator=None):
    """One token per row of logits (..., V), drawn from the top-k logits, then from the smallest set
    of tokens holding top_p of the mass (the likeliest token always stays). top_k == 1 is greedy."""
    V = logits.shape[-1]
    if top_k == 1:
        return logits.argmax(-1)
    logits = logits.float().clone()
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float('-inf'))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1)                  # ascending
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p    # the low-probability tail
        tail[..., -1] = False
        logits.masked_fill_(tail.scatter(-1, order, tail), float('-inf'))
    # inverse-CDF sampling: the first token whose cumulative probability exceeds u * total; a
    # removed token adds nothing to the sum, so is never first. The cap keeps u * total < total.
    cdf = logits.softmax(-1).cumsum(-1)                                 # (..., V)
    total = cdf[..., -1:]
    u = uniform(cdf.shape[:-1], generator, logits.device)[..., None] * total
    return torch.searchsorted(cdf, torch.minimum(u, total * (1 - 2 ** -20)), right=True)[..., 0]

@torch.no_grad()
def ssr_draw(model, logits_BLV, x_in, labels, num_classes, scales, which, draw, generator=None):
    """Eq. (5), first half: tokens {scale index: (B, pn^2)} drawn without gradient from the
    teacher-forced predictions of scales `which`. Guided draws need the unconditional logits: one
    more pass on the same inputs, outside autograd (the official code runs it as half of a doubled
    batch in the graph and pays for its backward). Guidance as the official trainer's: logits =
    (1+t) cond - t uncond, t = cfg * (1 + i/(K-1)) / 2 (inference ramps t otherwise: cfg_combine)."""
    K, be, drawn = len(scales), begin_ends(scales), {}
    guided = draw.input == 'cfg' and draw.cfg > 1
    uncond_BLV = model(torch.full_like(labels, num_classes), x_in, scales) if guided else None
    for i in which:
        a, b = be[i]
        lg = logits_BLV[:, a:b]                                                       # (B, pn^2, V)
        if guided:
            t = draw.cfg * 0.5 * (1 + i / (K - 1))
            lg = (1 + t) * lg - t * uncond_BLV[:, a:b]
        top_k = 1 if draw.input == 'argmax' else draw.top_k
        drawn[i] = sample_top_k_top_p(lg, top_k, draw.top_p, generator)
    return drawn

def student_pass(model, vae, labels, drawn, scales, transitions):
    """Eq. (5) second half and eq. (6): upsample the drawn tokens to the next scale and run pass 2.
    Returns the student logits (B, N, V) and the scale indices they predict, in order."""
    K = len(scales)
    if transitions == 'last':
        # One transition k -> k+1, k = K-2; the context is the class token (no pos_start) + the
        # input, i.e. the scale list [1, pn_{k+1}]: no coarser history (Algorithm 1, line 23).
        k, pn = K - 2, scales[K - 1]
        u = scale_shift(vae, drawn[k], scales[k], pn)                        # (B, pn^2, Cv)
        return model(labels, u, [1, pn], first_pos=False)[:, 1:], [K - 1]
    # 'all' (eq. 6/8): every scale's input is built from the teacher prediction of the scale before,
    # in one pass over the whole shifted sequence with the same block-causal mask.
    x_sf = tf_input(vae, [drawn[i] for i in range(K)], scales)
    return model(labels, x_sf, scales)[:, scales[0] ** 2:], list(range(1, K))

def sar_loss(model, gt_idx, x_in, labels, scales, gen=None, *, vae, num_classes, cond_drop=0.1,
             gamma=0.01, transitions='last', target='teacher', draw=SFDraw()):
    """Eq. (11): L_SAR = L_TF + gamma * L_CSF, with SSR's two passes. Returns (loss, info)."""
    loss_tf, info = tf_loss(model, gt_idx, x_in, labels, scales, gen, num_classes=num_classes,
                            cond_drop=cond_drop)                                 # pass 1
    K = len(scales)
    which = [K - 2, K - 1] if transitions == 'last' else list(range(K))
    drawn = ssr_draw(model, info['logits'], x_in, labels, num_classes, scales, which, draw, gen)
    lab_sf = drop_labels(labels, cond_drop, num_classes, gen)
    sf_logits, sf_scales = student_pass(model, vae, lab_sf, drawn, scales, transitions)  # eq. (6)
    pool = drawn if target == 'teacher' else dict(enumerate(gt_idx))
    csf_target = torch.cat([pool[i] for i in sf_scales], dim=1)   # f^(T) tokens (eq. 10) or the GT
    loss_csf = token_ce(sf_logits, csf_target)                    # eq. (10)
    info.update(loss_csf=loss_csf.detach(), sf_acc=(sf_logits.argmax(-1) == csf_target).float().mean())
    return loss_tf + gamma * loss_csf, info                       # eq. (11)

# ---- 5. sampling: KV cache, classifier-free guidance ---------------------------------------------
# The official sampler samples only at the side lengths the released models were trained on, up to
# 16; elsewhere it is greedy. Kept, so official checkpoints sample as in the official code.
OFFICIAL_SAMPLING_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

def cfg_combine(cond, uncond, si, K, cfg, form, pn):
    """Classifier-free guidance at scale index si of K. 'var' (official default): (1+t) c - t u with
    t = cfg * si / min(K-1, 9) (cfg beyond side 16): none at the first scale, 1+cfg from the 10th
    on. 'llamagen': the constant u + cfg * (c - u)."""
    if form == 'llamagen':
        return uncond + cfg * (cond - uncond)
    t = cfg * si / min(K - 1, 9) if pn <= 16 else cfg
    return (1 + t) * cond - t * uncond

def next_scale_input(model, vae, idx, pn, nxt):
    """(B, nxt^2, C): scale pn's tokens as the input of the next scale, exactly as in training."""
    return model.word_embed(scale_shift(vae, idx, pn, nxt).float()) + model.pos_embed([nxt])

@torch.no_grad()
def generate_tokens(model, vae, labels, scales, cfg=1.5, top_k=900, top_p=0.95, generator=None,
                    cfg_form='var', given=None):
    """The autoregressive rollout, scale by scale with a KV cache: each step feeds only the new
    scale's tokens, the coarser ones' keys/values come from the cache (no mask: a scale sees all
    before it, the block-causal rule). Conditional and unconditional rows run as one 2B batch
    (cfg=None: conditional only). `generator`: one, or one per image. `given`: {scale index:
    (B, pn^2)} maps used instead of drawn ones (naive student forcing keeps some at the GT). Needs
    eval mode (no drop-path). Returns per-scale tokens (B, pn^2) and guided logits (B, pn^2, V)."""
    B, K, given = labels.shape[0], len(scales), given or {}
    rows = labels if cfg is None else torch.cat((labels, torch.full_like(labels, model.num_classes)))
    cond_BC = model.class_emb(rows)                                     # (R, C), R = B or 2B
    x = model.embed(rows, None, scales[:1])[0]                          # the class token(s)
    caches = [dict() for _ in model.blocks]
    all_idx, all_logits = [], []
    for si, pn in enumerate(scales):
        for block, cache in zip(model.blocks, caches):
            x = block(x, cond_BC, None, cache)
        logits = model.logits(x, cond_BC)                               # (R, pn^2, V)
        if cfg is not None:
            logits = cfg_combine(logits[:B], logits[B:], si, K, cfg, cfg_form, pn)
        k = top_k if pn in OFFICIAL_SAMPLING_GRID else 1
        idx = given[si] if si in given else sample_top_k_top_p(logits, k, top_p, generator)
        all_idx.append(idx)
        all_logits.append(logits)
        if si + 1 < K:
            x = next_scale_input(model, vae, idx, pn, scales[si + 1]).repeat(len(rows) // B, 1, 1)
    return all_idx, all_logits

@torch.no_grad()
def sample(model, vae, labels, scales, cfg=1.5, top_k=900, top_p=0.95, generator=None,
           cfg_form='var', trajectory=False):
    """Images (B, 3, H, W), nominally in [-1, 1]: the rollout, then the decoded finest token map.
    trajectory=True also returns the image decoded after every scale (paper Fig. 7)."""
    idx, _ = generate_tokens(model, vae, labels, scales, cfg, top_k, top_p, generator, cfg_form)
    images = vae.decode_code(idx[-1], scales[-1])
    return (images, [vae.decode_code(t, p) for t, p in zip(idx, scales)]) if trajectory else images

# ---- 6. the training loop: one code path for 1 process and torchrun DDP --------------------------
def setup_distributed(device_name):
    """(rank, world, device). Under torchrun, even of 1 process: DDP, nccl on CUDA, gloo on CPU."""
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    ddp = world > 1 or 'TORCHELASTIC_RUN_ID' in os.environ      # torchrun sets it in its workers
    device = pick_device(device_name)                           # auto: cuda if there is one
    if device.type == 'cuda':  # under torchrun each process drives the GPU of its LOCAL_RANK
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']) if ddp else device.index or 0)
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device

def autocast_ctx(device, dtype):
    """--dtype: auto = bf16 autocast where the hardware computes bf16 natively (CUDA, CPUs with
    AVX512-BF16), fp32 elsewhere (emulated bf16 is slower than fp32; docs/benchmarks.md)."""
    cpu_bf16 = device.type == 'cpu' and cpu_speed.native_bf16()
    if dtype == 'fp32' or (dtype == 'auto' and device.type != 'cuda' and not cpu_bf16):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if dtype == 'fp16' else torch.bfloat16)

def make_optimizer(model, lr, weight_decay):
    """AdamW (0.9, 0.95), fused; decay on matrices only, not on biases, positions, temperatures."""
    decay, other = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or 'pos_1LC' in name or 'pos_start' in name or 'scale_mul' in name
        (other if skip else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=other, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)

def optimizer_step(model, opt, scaler, grad_clip):
    """Clip and step; returns the pre-clipping gradient norm. With fp16 (official: a GradScaler,
    init scale 2^11, growth every 1000 steps) the scaler skips a step whose gradients overflowed and
    halves the scale; the scale is capped at 32768 as officially (fp16 overflows at 65504)."""
    scaler.unscale_(opt)                                     # clip the true gradients
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)                                         # (a disabled scaler: opt.step())
    scaler.update()
    scaler.update(min(scaler.get_scale(), 32768.0)) if scaler.is_enabled() else None  # official cap
    opt.zero_grad(set_to_none=True)
    return norm

def train(args, make_loss):
    """Train and write <out-dir>/ckpt.pt. make_loss(args, vae, num_classes) gives the step's loss,
    (model, gt_idx, x_in, labels, scales, gen) -> (loss, info): tf_loss or sar_loss, configured."""
    rank, world, device = setup_distributed(args.device)
    master, ckpt_path = rank == 0, os.path.join(args.out_dir, 'ckpt.pt')
    if args.batch_size % (world * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} is not divisible by {world} process(es) x "
                        f"--grad-accum {args.grad_accum}")
    micro = args.batch_size // (world * args.grad_accum)
    check_writable(ckpt_path, '--out-dir')
    vae = load_tokenizer(args.vae, device, args.trust_checkpoint)       # frozen, eval mode
    if args.image_size % vae.downsample:
        raise UserError(f"--image-size {args.image_size} is not a multiple of {vae.downsample}, "
                        f"the tokenizer's downsample factor")
    check_scales(args.scales, args.image_size // vae.downsample)
    # flips/crops are drawn per image from its step_batches seed: the same on any number of ranks
    data = load_dataset(args.data, args.image_size, 'train', args.flip, args.seed, args.crop)
    if len(data) < args.batch_size:
        raise UserError(f"{args.data}: {len(data)} training images, fewer than a batch")
    torch.manual_seed(args.seed)
    raw = cpu_speed.apply(build_model(args, vae, data.num_classes).to(device))  # cpu_speed.py
    loss_fn = make_loss(args, vae, raw.num_classes)
    opt = make_optimizer(raw, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, init_scale=2. ** 11, growth_interval=1000,
                                  enabled=args.dtype == 'fp16')  # official fp16 AMP: optimizer_step
    step = 0
    if args.resume and os.path.isfile(ckpt_path):  # exact: weights, Adam, scaler; step = RNG state
        ck = load_checkpoint(ckpt_path, args.trust_checkpoint)
        sd = checked_state_dict(ck, args.depth, f"--resume {ckpt_path}")
        load_state_dict_strict(raw, sd, ckpt_path)
        opt.load_state_dict(ck['optimizer'])
        scaler.load_state_dict(ck['scaler']) if scaler.is_enabled() and ck.get('scaler') else None
        step = ck['step']
    for block in raw.blocks if args.compile else []:  # per block, dynamic: L varies every step,
        block.compile(dynamic=True)    # and the student pass has its own (docs/design.md)
    ddp = dist.is_initialized()                         # torchrun: DDP all-reduces the gradients
    model = DDP(raw, [device] if device.type == 'cuda' else None) if ddp else raw
    n, via = sum(p.numel() for p in raw.parameters()) / 1e6, f" DDP {dist.get_backend()}" if ddp else ''
    print(f"{args.mode}: {n:.2f}M params, {len(data)} images, flips {data.flip}, batch "
          f"{args.batch_size} = {world} x {micro} x {args.grad_accum}, {device}{via}, step {step}") if master else None

    def save(at_step):
        if master:
            keep = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))}
            save_atomic(dict(model=raw.state_dict(), config=raw.config, optimizer=opt.state_dict(),
                             args=keep, scaler=scaler.state_dict(),
                             tokenizer=os.path.abspath(args.vae), step=at_step), ckpt_path)

    batches = step_batches(len(data), args.batch_size, micro, world, rank, args.grad_accum,
                           range(step, args.steps), args.seed)
    loader = iter(torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=args.workers,
                                              pin_memory=device.type == 'cuda'))
    os.makedirs(args.out_dir, exist_ok=True)  # only now: bad input above leaves no half-made folder
    log_path = os.path.join(args.out_dir, 'log.jsonl')
    trim_log(log_path, step) if master else None      # the steps after the checkpoint are run again
    log = open(log_path, 'a') if master else None
    bar = tqdm(total=args.steps, initial=step, disable=not master or args.quiet, desc=args.mode)
    raw.train()
    t0, t0_step = time.time(), step                 # for images/s over the steps since the last log
    try:
        while step < args.steps:
            lr = lr_at(step, args.steps, args.lr, args.warmup_steps, args.lr_end, args.lr_hold)
            for g in opt.param_groups:
                g['lr'] = lr
            # every random draw of the step (SF sampling, class dropout, drop-path, the scale list)
            # derives from (seed, step, rank) as the data do: the step is the RNG state, resume exact
            gen = torch.Generator(device=device).manual_seed(step_seed(args.seed, step, rank))
            torch.manual_seed(step_seed(args.seed, step, rank))
            scales = random_scales(args.scales, random.Random(step_seed(args.seed, step))) \
                if args.scale_schedule == 'random' else list(args.scales)
            totals = {}
            for m in range(args.grad_accum):
                images, labels = (t.to(device, non_blocking=True) for t in next(loader))
                gt_idx, x_in = gt_tokens_and_inputs(vae, images, scales)
                with nullcontext() if not ddp or m == args.grad_accum - 1 else model.no_sync():
                    with autocast_ctx(device, args.dtype):
                        loss, info = loss_fn(model, gt_idx, x_in, labels, scales, gen)
                    scaler.scale(loss / args.grad_accum).backward()
                for k, v in dict(info, loss=loss.detach()).items():  # micro-batch mean of scalars
                    if v.dim() == 0:
                        totals[k] = totals.get(k, 0.0) + v.float() / args.grad_accum
            totals['grad_norm'] = optimizer_step(raw, opt, scaler, args.grad_clip).float()
            if world > 1:  # every logged number is the mean over processes, as the gradients are
                stats = torch.stack(list(totals.values()))
                dist.all_reduce(stats)
                totals = dict(zip(totals, stats / world))
            loss, grad_norm = totals['loss'], totals['grad_norm']
            # non-finite = failure, except inf gradients under fp16: an overflow the scaler skipped
            if not torch.isfinite(loss) or (not torch.isfinite(grad_norm) and not scaler.is_enabled()):
                last = ckpt_path if os.path.isfile(ckpt_path) else 'none yet'
                raise UserError(f"loss {loss.item()} / grad norm {grad_norm.item()} at step "
                                f"{step}: stopped; the last good checkpoint ({last}) is untouched. "
                                f"Try a lower --lr, --dtype bf16/fp32 not fp16, or check the data")
            step += 1
            bar.update(1)
            if master and (step % args.log_every == 0 or step == args.steps):
                rec = dict({k: v.item() for k, v in totals.items()}, step=step, lr=lr, scales=scales,
                           imgs_per_s=(step - t0_step) * args.batch_size / (time.time() - t0))
                rec.update(fp16_scale=scaler.get_scale()) if scaler.is_enabled() else None
                print(json.dumps(rec), file=log, flush=True)
                short = {k: round(v, 5) if type(v) is float else v for k, v in rec.items()}
                tqdm.write(json.dumps(short))
                t0, t0_step = time.time(), step
            if step % args.ckpt_every == 0 or step == args.steps:
                save(step)
    except KeyboardInterrupt:  # Ctrl-C keeps the finished steps: the weights after `step` steps
        save(step)
        raise KeyboardInterrupt(f"step {step} checkpointed to {ckpt_path}; continue with --resume")
    finally:
        bar.close()
        log.close() if log else None
    print(f"done: {step} steps; checkpoint {ckpt_path}") if master else None
    return raw

# ---- 7. checkpoint I/O and the sampling command --------------------------------------------------
def extract_state_dict(ckpt):
    """Every layout in the wild: ours {'model': sd}, the official training output {'trainer':
    {'var_wo_ddp': sd}}, or a flat FlexVAR state_dict (the released FlexVARd*-epo*.pth)."""
    if isinstance(ckpt.get('trainer'), dict) and 'var_wo_ddp' in ckpt['trainer']:
        ckpt = ckpt['trainer']['var_wo_ddp']
    sd = ckpt['model'] if isinstance(ckpt.get('model'), dict) else ckpt
    sd = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in sd.items()}
    sd.pop('attn_bias_for_masking', None)  # the official mask, for whichever scale list came last
    return sd

def config_from_state_dict(sd):
    """(depth, V, num_classes, Cv) from the tensor shapes, so a checkpoint describes itself."""
    if 'pos_start' not in sd or 'head.weight' not in sd:
        raise UserError("not a FlexVAR/SAR transformer checkpoint (no 'pos_start' / 'head.weight')")
    return dict(depth=sd['pos_start'].shape[-1] // 64, vocab_size=sd['head.weight'].shape[0],
                num_classes=len(sd['class_emb.weight']) - 1,
                codebook_dim=sd['word_embed.weight'].shape[1])

def checked_state_dict(ckpt, depth, what):
    """A checkpoint's transformer state_dict, refused in one clear line if of another depth."""
    sd = extract_state_dict(ckpt)
    if (d := config_from_state_dict(sd)['depth']) != depth:
        raise UserError(f"{what} holds a depth-{d} model but --depth is {depth}: pass --depth {d}")
    return sd

def build_model(args, vae, num_classes):
    """A FlexVAR for the tokenizer's codebook: initialised as the official code does, or --init."""
    V, Cv = vae.codebook().shape
    gates = 1e-4 if args.depth >= 24 else 1e-3                           # the official --alng
    model = FlexVAR(args.depth, V, num_classes, Cv, args.drop_path).init_weights(init_adaln_gamma=gates)
    if args.init:
        what = f"--init {args.init}"
        sd = checked_state_dict(load_checkpoint(args.init, args.trust_checkpoint), args.depth, what)
        load_state_dict_strict(model, sd, what)
    return model

def load_for_sampling(ckpt_path, vae_path, device, trust=False):
    """A checkpoint (ours or official) and its tokenizer -> (model in eval mode, vae, our args)."""
    ck = load_checkpoint(ckpt_path, trust)
    sd = extract_state_dict(ck)
    model = FlexVAR(**config_from_state_dict(sd))
    load_state_dict_strict(model, sd, ckpt_path)
    ours = ck.get('args') if isinstance(ck.get('args'), dict) else None
    vae_path = vae_path or (ck.get('tokenizer') if ours else None)
    if not vae_path:
        raise UserError(f"{ckpt_path} names no tokenizer: pass --vae (official: FlexVAE.pth)")
    vae = load_tokenizer(vae_path, device, trust)
    if tuple(vae.codebook().shape) != (model.V, model.config['codebook_dim']):
        raise UserError(f"tokenizer {vae_path} has a {tuple(vae.codebook().shape)} codebook; the "
                        f"model expects ({model.V}, {model.config['codebook_dim']})")
    return model.to(device).eval(), vae, ours

@torch.no_grad()
def run_sampling(args):
    """--sample: --num-samples images per class -> samples.png (a row per class), optional
    trajectory.png, per-image PNGs and an ADM-style .npz (arr_0 uint8 NHWC, labels). Image i draws
    from a generator seeded by (--seed, i): it depends neither on --sample-batch nor on the number
    of processes. Under torchrun rank r takes batches r, r+world, ... and writes them into one
    shared memory-mapped array: 50,000 images never sit in memory."""
    rank, world, device = setup_distributed(args.device)
    model, vae, ours = load_for_sampling(args.ckpt, args.vae, device, args.trust_checkpoint)
    model = cpu_speed.apply(model)                        # threads, memory, kernels (cpu_speed.py)
    scales = args.scales or (ours['scales'] if ours else list(OFFICIAL_SCALES))
    cfg = {16: 2.2, 20: 2.6, 24: 3.3}.get(model.depth, 1.5)  # official eval values; the laptop's 1.5
    cfg = cfg if args.cfg is None else args.cfg
    classes = list(range(model.num_classes)) if args.classes == 'all' else args.classes
    if not set(classes) <= set(range(model.num_classes)):
        raise UserError(f"--classes out of range: the model has classes 0..{model.num_classes - 1}")
    out = args.out_dir or os.path.dirname(os.path.abspath(args.ckpt))
    check_writable(os.path.join(out, 'samples.png'), '--out-dir')
    check_writable(args.save_npz, '--save-npz') if args.save_npz else None  # before hours of work
    labels = torch.tensor([c for c in classes for _ in range(args.num_samples)])
    n, bs, side = len(labels), args.sample_batch, scales[-1] * vae.downsample
    path = os.path.join(out, '.samples.npy')
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        np.lib.format.open_memmap(path, 'w+', np.uint8, (n, side, side, 3)).flush()
    dist.barrier() if world > 1 else None
    arr = np.load(path, mmap_mode='r+')                                  # (n, H, W, 3) uint8
    gens = lambda lo, hi: [torch.Generator(device).manual_seed(step_seed(args.seed, i))
                           for i in range(lo, hi)]                      # one generator per image
    try:  # the memory-mapped scratch file goes, whatever happens
        for b in tqdm(range(rank, (n + bs - 1) // bs, world), disable=rank != 0 or args.quiet,
                      desc='sampling'):
            lo, hi = b * bs, min(n, (b + 1) * bs)
            with autocast_ctx(device, args.dtype):
                images = sample(model, vae, labels[lo:hi].to(device), scales, cfg, args.top_k,
                                args.top_p, gens(lo, hi), args.cfg_form)
            arr[lo:hi] = to_uint8(images)
        arr.flush()
        dist.barrier() if world > 1 else None
        if rank == 0:
            save_samples(args, arr, labels, classes, out)
            if args.trajectory:  # Fig. 7: the first 8 samples (rows) after each scale (columns)
                with autocast_ctx(device, args.dtype):       # as above, so they are the same 8
                    _, steps = sample(model, vae, labels[:8].to(device), scales, cfg, args.top_k,
                                      args.top_p, gens(0, min(8, n)), args.cfg_form, trajectory=True)
                up = [F.interpolate(s.float(), size=(side, side), mode='nearest') for s in steps]
                traj = torch.stack(up, 1).flatten(0, 1)
                save_image_grid(traj, os.path.join(out, 'trajectory.png'), nrow=len(scales))
    finally:
        if rank == 0 and os.path.exists(path):
            os.remove(path)

def save_samples(args, arr, labels, classes, out):
    """The sampled images (n, H, W, 3) uint8 -> samples.png (up to 10 classes x 10, a row per
    class), and with --save-png / --save-npz one PNG per image and the ADM-style .npz."""
    per_class = min(args.num_samples, 10)
    keep = [i for i, c in enumerate(labels.tolist())
            if classes.index(c) < 10 and i % args.num_samples < 10]
    grid = torch.from_numpy(arr[keep]).permute(0, 3, 1, 2) / 127.5 - 1
    save_image_grid(grid, os.path.join(out, 'samples.png'), nrow=per_class)
    for i, (img, c) in enumerate(zip(arr, labels.tolist()) if args.save_png else []):
        os.makedirs(os.path.join(out, 'samples', str(c)), exist_ok=True)
        Image.fromarray(img).save(os.path.join(out, 'samples', str(c), f'{i:06d}.png'))
    if args.save_npz:  # np.savez streams the memory-mapped array into the zip in 16 MiB chunks
        atomic_write(args.save_npz, lambda f: np.savez(f, arr_0=arr, labels=labels.numpy()))
    print(f"wrote {out}/samples.png" + (f", {args.save_npz} ({len(arr)} images)" if args.save_npz else ''))

# ---- 8. the command line -------------------------------------------------------------------------
# The official runs (official scripts): base LR tblr * batch / 256 on the 'lin0' schedule over `ep`
# epochs (2 % warm-up, hold 5 %, then linear to wpe * peak); SAR re-enters it after epoch `start`.
OFFICIAL_RECIPES = {16: dict(tblr=1e-4, wpe=0.1, ep=190, start=179),
                    20: dict(tblr=1e-4, wpe=0.1, ep=260, start=249),
                    24: dict(tblr=8e-5, wpe=0.01, ep=360, start=349)}

def official_lr(depth, mode, batch):
    """(peak, end fraction, hold fraction) of the official run at this depth (the nearest recipe).
    Pretraining runs the whole lin0 schedule; SAR continues it from epoch `start` to `ep`, where
    lin0 is linear, so its LR decays linearly from the schedule's value at `start` to wpe * peak."""
    r = OFFICIAL_RECIPES[min(OFFICIAL_RECIPES, key=lambda d: abs(d - depth))]
    peak = r['tblr'] * batch / 256
    if mode == 'tf':
        return peak, r['wpe'], 0.05
    at_start = lr_at(r['start'], r['ep'], 1.0, r['ep'] / 50, r['wpe'], 0.05)
    return peak * at_start, r['wpe'] / at_start, 0.0

def get_parser():
    p = ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, description="SAR "
                       "for FlexVAR. Defaults: the laptop run below depth 12, else the official.")
    a = p.add_argument
    a('--mode', choices=['tf', 'sar'], default='tf', help="tf: eq. 2; sar: eq. 11, TF + gamma*CSF")
    a('--sample', action='store_true', help="generate images from --ckpt instead of training")
    a('--depth', type=int, default=4, help="transformer depth: width 64*depth, heads = depth")
    a('--data', default='toy', help="'toy', ImageFolder dir, .npz (images, labels), MNIST IDX dir")
    a('--vae', help="the tokenizer (training: out/tokenizer.pt; sampling: the checkpoint's)")
    a('--image-size', type=int, help="resolution (32; depth >= 12: 512, official; paper: 256)")
    a('--crop', choices=['center', 'random'], help="random: official (depth >= 12), 0.88-1 jitter")
    a('--scales', help="scale list (1,...,6,8; depth >= 12: 1,...,10,13,16; sampling: the ckpt's)")
    a('--scale-schedule', choices=['random', 'fixed'], default='random', help="random: official")
    a('--init', default='', help="initial weights: official FlexVAR/SAR checkpoint or one of ours")
    a('--trust-checkpoint', action='store_true', help="allow checkpoints that need full unpickling")
    a('--sf-transitions', choices=['last', 'all'], default='last', help="last: official; all: eq. 6/8")
    a('--csf-target', choices=['teacher', 'gt'], default='teacher', help="teacher: eq. 10; gt: Algorithm 1")
    a('--sf-input', choices=['argmax', 'sample', 'cfg'], default='cfg', help="pass 1 -> SF inputs")
    a('--sf-top-k', type=int, default=900, help="top-k of SF sampling (official 900)")
    a('--sf-top-p', type=float, default=0.96, help="top-p of SF sampling (official trainer 0.96)")
    a('--sf-cfg', type=float, default=1.2, help="SF sampling CFG, ramped (official 1.2; <= 1: off)")
    a('--gamma', type=float, default=0.01, help="weight of L_CSF, eq. 11 (official sigma 0.01)")
    a('--steps', type=int, default=1200, help="optimizer steps")
    a('--batch-size', type=int, default=32, help="global batch (over processes and --grad-accum)")
    a('--grad-accum', type=int, default=1, help="micro-steps per optimizer step")
    a('--lr', type=float, help="peak LR (tf 1e-3; sar 1e-4: where tf ends; depth >= 12: official)")
    a('--lr-end', type=float, help="final LR / peak (tf 0.1; sar 1; depth >= 12: official)")
    a('--warmup-steps', type=int, help="linear warm-up steps (tf: 2%% of --steps; sar: 0)")
    a('--weight-decay', type=float, default=0.05, help="AdamW weight decay on matrices")
    a('--grad-clip', type=float, default=2.0, help="gradient-norm clipping")
    a('--cond-drop', type=float, default=0.1, help="class dropout (trains the model CFG uses)")
    a('--drop-path', type=float, help="max stochastic-depth rate (default 0.1*depth/24)")
    a('--flip', action=argparse.BooleanOptionalAction, help="random h-flips (on at d>=12 and for colour)")
    a('--dtype', choices=['auto', 'bf16', 'fp16', 'fp32'], default='auto', help="bf16 if native, else fp32")
    a('--compile', action='store_true', help="torch.compile the model")
    a('--out-dir', default='', help="output folder (default out/<mode>; sampling: the ckpt's)")
    a('--resume', action='store_true', help="continue from <out-dir>/ckpt.pt if it exists")
    a('--ckpt-every', type=int, default=200, help="checkpoint every N steps and at the end")
    a('--log-every', type=int, default=50, help="log every N steps (stdout + <out-dir>/log.jsonl)")
    a('--seed', type=int, default=0, help="seed of all randomness: data order, training, sampling")
    a('--device', default='auto', help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    a('--workers', type=int, default=1, help="DataLoader worker processes")
    a('--quiet', action='store_true', help="no progress bar; log lines only")
    a('--ckpt', default='', help="--sample: the checkpoint (ours, or an official one with --vae)")
    a('--cfg', type=float, help="--sample: guidance (1.5; official d16/d20/d24: 2.2/2.6/3.3)")
    a('--cfg-form', choices=['var', 'llamagen'], default='var', help="var: official ramp; llamagen: constant")
    a('--top-k', type=int, default=900, help="--sample: top-k (official 900)")
    a('--top-p', type=float, default=0.95, help="--sample: top-p (official 0.95)")
    a('--classes', default='all', help="--sample: 'all' or comma-separated class ids")
    a('--num-samples', type=int, default=8, help="--sample: images per class")
    a('--sample-batch', type=int, default=64, help="--sample: images per forward batch")
    a('--save-npz', default='', help="--sample: also write all images to this .npz (arr_0, labels)")
    a('--save-png', action='store_true', help="--sample: also a PNG per image in <out-dir>/samples")
    a('--trajectory', action='store_true', help="--sample: the image after each scale too (Fig. 7)")
    return p

# every numeric flag's valid range, checked in one place on the values as given (None: not given)
RANGES = {**{k: ('>= 1', lambda v: v >= 1) for k in ('depth', 'steps', 'batch_size', 'grad_accum',
                                                    'image_size', 'log_every', 'ckpt_every',
                                                    'num_samples', 'sample_batch')},
          **{k: ('>= 0', lambda v: v >= 0) for k in ('warmup_steps', 'workers', 'lr_end',
                                                    'weight_decay', 'gamma', 'sf_top_k', 'sf_cfg',
                                                    'cfg', 'top_k')},
          **{k: ('> 0', lambda v: v > 0) for k in ('lr', 'grad_clip')},
          **{k: ('in [0, 1)', lambda v: 0 <= v < 1) for k in ('cond_drop', 'drop_path')},
          **{k: ('in [0, 1]', lambda v: 0 <= v <= 1) for k in ('top_p', 'sf_top_p')}}
# flags both commands read; the others are training's or (help "--sample: ...") sampling's: given
# to the command that does not read them, they are an error instead of being silently ignored
SHARED = ('sample', 'vae', 'scales', 'trust_checkpoint', 'dtype', 'out_dir', 'seed', 'device',
          'quiet')
SAMPLE_ONLY = ('ckpt', 'cfg', 'cfg_form', 'top_k', 'top_p', 'classes', 'num_samples',
               'sample_batch', 'save_npz', 'save_png', 'trajectory')

def resolve_args(args):
    """Fill the size- and mode-dependent defaults (see --help); refuse bad values before any work."""
    check_ranges(args, RANGES)
    official = args.depth >= 12
    if args.scales or not args.sample:  # sampling defaults to the checkpoint's list
        args.scales = parse_scales(args.scales or ','.join(map(str, OFFICIAL_SCALES if official
                                                                else LAPTOP_SCALES)))
    args.image_size = args.image_size or (512 if official else 32)
    args.crop = args.crop or ('random' if official else 'center')
    args.flip = True if official and args.flip is None else args.flip  # None: by data.colour_photos
    args.vae = args.vae or (None if args.sample else os.path.join('out', 'tokenizer.pt'))
    args.out_dir = args.out_dir or ('' if args.sample else os.path.join('out', args.mode))
    peak, end, args.lr_hold = official_lr(args.depth, args.mode, args.batch_size) if official else \
        ((1e-3, 0.1, 0.05) if args.mode == 'tf' else (1e-4, 1.0, 0.0))
    warm = args.steps // 50 if args.mode == 'tf' else 0            # 2 % warm-up, the official ep/50
    args.lr = peak if args.lr is None else args.lr
    args.lr_end = end if args.lr_end is None else args.lr_end
    args.warmup_steps = warm if args.warmup_steps is None else args.warmup_steps
    if args.classes != 'all':
        try:
            args.classes = [int(c) for c in args.classes.split(',')]
        except ValueError:
            raise UserError(f"--classes {args.classes!r}: 'all' or comma-separated ids") from None
    if args.sample and not args.ckpt:
        raise UserError("--sample needs --ckpt CKPT (e.g. out/sar/ckpt.pt)")
    return args

def loss_for(args, vae, num_classes):
    """The loss of --mode, bound to its settings: tf_loss (eq. 9) or sar_loss (eq. 11)."""
    if args.mode == 'tf':
        return functools.partial(tf_loss, num_classes=num_classes, cond_drop=args.cond_drop)
    draw = SFDraw(args.sf_input, args.sf_top_k, args.sf_top_p, args.sf_cfg)
    return functools.partial(sar_loss, vae=vae, num_classes=num_classes, cond_drop=args.cond_drop,
                             gamma=args.gamma, transitions=args.sf_transitions,
                             target=args.csf_target, draw=draw)

def main(argv=None, make_loss=loss_for):
    """The command line (experiments/ train other losses via make_loss): one line `error: ...`."""
    try:
        parser = get_parser()
        args = parser.parse_args(argv)
        given = dict(vars(args))           # the flags as typed, before the defaults are filled in
        args = resolve_args(args)
        train_only = [k for k in given if k not in SHARED + SAMPLE_ONLY]
        check_unused(given, parser, train_only if args.sample else SAMPLE_ONLY,
                     '--sample does not read' if args.sample else 'training does not read')
        run_sampling(args) if args.sample else train(args, make_loss)
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        sys.exit(130)
    finally:  # gc first: the DDP wrapper, a reference cycle, holds the process group; left to the
        if dist.is_initialized():   # end of the interpreter, gloo's threads aborted ~1 exit in 13
            gc.collect()
            dist.destroy_process_group()

if __name__ == '__main__':
    main()
