"""
The official side of docs/benchmarks.md: time the official SAR code (GengzeZhou/SAR) with bench.py's flags.

    python experiments/official_timing.py --official /path/to/SAR --depth 16 --batch-size 2 \
        --scales 1,2,3,4,5,6,8,10,13,16 --image-size 256 --dtype fp32 --bench-steps 4 --mode sar --sf-input cfg
    python experiments/official_timing.py --official /path/to/SAR --sampling --depth 16 --batch-size 4 \
        --image-size 256 --dtype fp32 --bench-steps 4
    python experiments/ratio.py ours.txt official.txt      # ours / official, from the two JSON lines

--official is a clone of the official repository; its modules are imported as they are, and only imports that
need packages this project does not install (huggingface_hub, the official logging helpers) are replaced by
small stand-ins when they fail. The models are the official FlexVAR and the FlexVAE architecture (VQ-16,
8912 codes of 32 dims) with random weights: the cost does not depend on the values.

A step is the official trainer's train_step on the fixed --scales list: VAE encode + tokenization, forward,
loss, backward, gradient clipping, AdamW. --mode tf is its teacher-forcing mode; --mode sar its csfl mode,
with argmax SF inputs (--sf-input argmax), sampled ones (sample) or CFG-sampled ones (cfg: the official
default recipe); --csf-target gt is its tf_then_single_sf mode. --mode sar also times the two parts that
bench.py times alone, done with the official model: the student pass and a no-grad unconditional forward.
--sampling times the official autoregressive_infer_cfg (KV cache, CFG, top-k/top-p) + VAE decode.

Precision as the official training script sets it: on CUDA its AmpOptimizer (mixed_precision 2 = bf16
autocast, 1 = fp16 with its GradScaler), fused AdamW and TF32; sampling under autocast. Its mixed precision is
CUDA-only, so on the CPU a training step runs in fp32 (--dtype fp32), and AdamW in its for-loop form, as in
the CPU measurements of docs/benchmarks.md. Unlike sar.py this script leaves glibc's malloc settings alone,
as the official scripts do (set MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1 to give it the same).
Prints one line per step and one JSON line with bench.py's keys (side: "official").
"""
import contextlib
import importlib
import json
import os
import statistics
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import get_parser, parse, report, timed, train_flops_per_image  # noqa: E402  (the same flags, measure)
import cpu_speed  # noqa: E402  (bench.py put the project on the path)
from common import UserError  # noqa: E402

# what a clone of the official code must hold for this script (the modules it imports and theirs)
OFFICIAL_FILES = ('trainer.py', 'dist.py', 'models/__init__.py', 'models/flexvar.py', 'models/basic_var.py',
                  'models/helpers.py', 'models/vq_llama.py', 'utils/amp_sc.py')
NUM_CLASSES, CODES, CODE_DIM = 1000, 8912, 32        # ImageNet; the released FlexVAE's codebook


class NoLog:
    """Stands in for the official MetricLogger / UnifiedLogger: train_step logs only when it % log_iters == 0,
    which with it=1 never happens, so no step pays for the logging's .item() calls."""
    log_iters = 2 ** 62

    def __init__(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass


# ---------------------------------------------------------------------------------------------------------
# the official code, imported as it is
# ---------------------------------------------------------------------------------------------------------
def check_official(path):
    """The absolute path of a clone of the official code, or a UserError that says what to pass."""
    hint = "pass --official PATH, PATH a clone of the official SAR code (GengzeZhou/SAR)"
    if not path:
        raise UserError(f"the official code is missing; {hint}")
    if not os.path.isdir(path):
        raise UserError(f"--official {path}: no such folder; {hint}")
    missing = [f for f in OFFICIAL_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise UserError(f"--official {path} is not a clone of the official SAR code: it lacks "
                         f"{', '.join(missing)}; {hint}")
    return os.path.abspath(path)


def import_or_stand_in(name, **attrs):
    """Import a module the official code imports; if it needs packages that are not installed, put a module
    with just the names the official code uses in its place."""
    try:
        importlib.import_module(name)
    except Exception:                       # ImportError, or whatever a half-installed dependency raises
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__dict__.update(attrs)


def import_official(path):
    """The official classes this script drives, imported from the clone at path."""
    sys.path.insert(0, path)
    if not os.path.isfile(os.path.join(path, 'utils', '__init__.py')):
        # utils/ is a namespace package there: bind it to the clone, so that no installed `utils` shadows it
        sys.modules['utils'] = types.ModuleType('utils')
        sys.modules['utils'].__path__ = [os.path.join(path, 'utils')]
    import_or_stand_in('huggingface_hub', PyTorchModelHubMixin=type('PyTorchModelHubMixin', (), {}))
    import_or_stand_in('utils.misc', MetricLogger=NoLog)
    import_or_stand_in('utils.logger', UnifiedLogger=NoLog)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            from models.flexvar import FlexVAR
            from models.vq_llama import VQ_models
            from trainer import VARTrainer
            from utils.amp_sc import AmpOptimizer
    except Exception as e:
        raise UserError(f"--official {path}: importing the official code failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass a clone of GengzeZhou/SAR") from None
    return types.SimpleNamespace(FlexVAR=FlexVAR, VQ_models=VQ_models, VARTrainer=VARTrainer,
                                 AmpOptimizer=AmpOptimizer)


def build(off, args, device, drop_path):
    """(FlexVAE tokenizer, FlexVAR) with random weights on device, built as the official build_vae_var does
    (which we cannot call: it insists on loading a tokenizer checkpoint). Their size prints go to stderr."""
    d = args.depth
    with contextlib.redirect_stdout(sys.stderr):
        vae = off.VQ_models['VQ-16'](codebook_size=CODES, codebook_embed_dim=CODE_DIM)
        vae = vae.to(device).eval().requires_grad_(False)        # frozen: train_step encodes without no_grad
        var = off.FlexVAR(vae_local=vae, num_classes=NUM_CLASSES, depth=d, embed_dim=64 * d, num_heads=d,
                          drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=drop_path, norm_eps=1e-6,
                          shared_aln=False, cond_drop_rate=0.1, token_dropout_p=0.05, attn_l2_norm=True,
                          patch_nums=tuple(args.scales), flash_if_available=True, fused_if_available=True)
        var = var.to(device)
        var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    var.rng = torch.Generator(device=device)  # made on the official dist's device, which may not be ours
    return vae, var


# ---------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------
def make_trainer(off, args, device, vae, var, mixed_precision):
    """The official VARTrainer in the mode of --mode/--sf-input/--csf-target, on the fixed --scales list."""
    decay, no_decay = [], []
    for name, p in var.named_parameters():  # matrices decay; vectors and position tables do not
        skip = p.ndim <= 1 or name.endswith('bias') or any(k in name for k in ('pos_1LC', 'pos_start', 'scale_mul'))
        (no_decay if skip else decay).append((name, p))
    groups = [dict(params=[p for _, p in g], weight_decay=wd) for g, wd in ((decay, 0.05), (no_decay, 0.0))]
    adamw = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=device.type == 'cuda')
    named = decay + no_decay
    opt = off.AmpOptimizer(mixed_precision=mixed_precision, optimizer=adamw, names=[n for n, _ in named],
                           paras=[p for _, p in named], grad_clip=2.0, n_gradient_accumulation=1)
    mode = 'teacher_forcing' if args.mode == 'tf' else 'csfl' if args.csf_target == 'teacher' else \
        'tf_then_single_sf'
    trainer = off.VARTrainer(
        device=device, patch_nums=tuple(args.scales), resos=tuple(16 * p for p in args.scales), vae_local=vae,
        var_wo_ddp=var, var=var, var_opt=opt, label_smooth=0.0, training_mode=mode, sigma=args.gamma,
        sf_cfg_scale=args.sf_cfg if args.sf_input == 'cfg' else 1.0, sf_top_k=min(args.sf_top_k, CODES),
        sf_top_p=args.sf_top_p, sf_use_sampling=args.sf_input != 'argmax')
    trainer.gen_curr_patch_nums = lambda: list(args.scales)  # the fixed list, as bench.py (official: random)
    return trainer


def bench_training(off, args, device, dtype):
    torch.manual_seed(args.seed)
    vae, var = build(off, args, device, 0.1 * args.depth / 24 if args.drop_path is None else args.drop_path)
    var.train()
    trainer = make_trainer(off, args, device, vae, var, {'fp32': 0, 'fp16': 1, 'bf16': 2}[dtype])
    B, scales = args.batch_size, list(args.scales)
    images = torch.rand(B, 3, args.image_size, args.image_size, device=device) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (B,), device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()

    def step():
        trainer.train_step(it=1, g_it=1, stepping=True, metric_lg=NoLog(), tb_lg=NoLog(), inp_B3HW=images,
                           label_B=labels, prog_si=-1, prog_wp_it=1.0)

    times = []
    for i in range(args.bench_steps):
        times.append(timed(step, sync, 1))
        print(f"step {i}: {times[-1]:.1f} ms{' (warm-up)' if i == 0 else ''}", flush=True)
    med = statistics.median(times[1:] or times)
    res = dict(side='official', depth=args.depth, params_M=round(sum(p.numel() for p in var.parameters()) / 1e6, 2),
               batch=B, mode=args.mode, sf_input=args.sf_input if args.mode == 'sar' else None, scales=scales,
               image_size=args.image_size, device=str(device), dtype=args.dtype, compile=False,
               ms_per_step=med, min_ms=min(times[1:] or times), images_per_s=round(B * 1000 / med, 2))
    if args.mode == 'sar':
        res.update(sar_parts(trainer, var, images, labels, scales, sync))
    return report(res, device, train_flops_per_image(var.C, var.depth, var.V, scales, args), args)


def sar_parts(trainer, var, images, labels, scales, sync):
    """The two parts bench.py times alone, done with the official model and its AMP context: the student pass
    ([class, last scale] forward + loss + backward, as csfl runs it) and the no-grad forward of the whole
    sequence with the unconditional class (the official csfl recipe instead runs it with gradients)."""
    with torch.no_grad():
        x_in, gt = trainer.encode_var_wo_firstL(images, scales)
    last = scales[-1] ** 2
    amp = trainer.var_opt.amp_ctx

    def student():
        with amp:
            logits = var(labels, x_in[:, -last:], [1, scales[-1]], student_forcing=True)
            loss = trainer.train_loss(logits.reshape(-1, var.V), gt[:, -last:].reshape(-1)).mean()
        loss.backward()
        var.zero_grad(set_to_none=True)

    def uncond():
        with torch.no_grad(), amp:
            var(torch.full_like(labels, NUM_CLASSES), x_in, scales)
    return dict(student_pass_ms=timed(student, sync, 3), nograd_forward_ms=timed(uncond, sync, 3))


@torch.no_grad()
def bench_sampling(off, args, device, dtype):
    torch.manual_seed(args.seed)
    vae, var = build(off, args, device, 0.0)
    var.eval()
    B, scales = args.batch_size, list(args.scales)
    labels = torch.arange(B, device=device) % NUM_CLASSES
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    cfg = 2.2 if args.cfg is None else args.cfg
    amp = contextlib.nullcontext() if dtype == 'fp32' else \
        torch.autocast(device.type, dtype=torch.float16 if dtype == 'fp16' else torch.bfloat16)
    times = []
    for i in range(args.bench_steps):
        def one():
            with amp:
                var.autoregressive_infer_cfg(vqvae=vae, B=B, label_B=labels, infer_patch_nums=scales, g_seed=i,
                                             cfg=cfg, top_k=args.top_k, top_p=args.top_p,
                                             used_llamagen_cfg=args.cfg_form == 'llamagen')
        times.append(timed(one, sync, 1))
        print(f"batch {i}: {times[-1]:.1f} ms{' (warm-up)' if i == 0 else ''}", flush=True)
    med = statistics.median(times[1:] or times)
    res = dict(side='official', depth=args.depth, batch=B, scales=scales, cfg=cfg, top_k=args.top_k,
               top_p=args.top_p, device=str(device), dtype=args.dtype, s_per_batch=round(med / 1000, 3),
               images_per_s=round(B * 1000 / med, 3))
    print(json.dumps(res))
    return res


# ---------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------
# flags of sar.py (through bench.py's parser) that have no counterpart in the official trainer
NOT_OFFICIAL = ('vae', 'compile', 'sf_transitions', 'grad_accum', 'scale_schedule')


def resolve(args, parser):
    """Refuse what the official code cannot run before building anything. Returns (device, dtype used)."""
    unsupported = [k for k in NOT_OFFICIAL if getattr(args, k) != parser.get_default(k)]
    if unsupported:
        raise UserError(f"the official trainer has no counterpart of --{unsupported[0].replace('_', '-')}")
    if args.device not in ('auto', 'cpu', 'cuda'):
        raise UserError(f"--device {args.device}: pass auto, cpu or cuda")
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; pass --device cpu")
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          args.device if args.device != 'auto' else 'cpu')
    dtype = args.dtype
    if dtype == 'auto':                     # sar.autocast_ctx's rule
        dtype = 'bf16' if device.type == 'cuda' or cpu_speed.native_bf16() else 'fp32'
    if device.type == 'cpu' and dtype != 'fp32' and not args.sampling:
        shown = args.dtype + (f" ({dtype} here)" if args.dtype == 'auto' else '')
        raise UserError(f"--dtype {shown}: the official trainer's mixed precision is CUDA-only "
                        f"(AmpOptimizer autocasts 'cuda'); pass --dtype fp32 on the CPU")
    return device, dtype


def main(argv=None):
    p = get_parser(__doc__.split('\n\n')[0])
    p.add_argument('--official', help="a clone of the official SAR code (GengzeZhou/SAR), e.g. /path/to/SAR")
    try:
        raw = p.parse_args(argv)
        path = check_official(raw.official)
        args = parse(p, argv)
        device, dtype = resolve(args, p)
        off = import_official(path)
        if device.type == 'cuda':           # the official training script's default (tf32=True)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return (bench_sampling if args.sampling else bench_training)(off, args, device, dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
