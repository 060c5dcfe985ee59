"""
Time training steps of sar.py on random weights: teacher forcing, or a SAR step and its parts.

    python experiments/bench.py --depth 16 --batch-size 2 --scales 1,2,3,4,5,6,8,10,13,16 --image-size 256 \
        --dtype fp32 --bench-steps 4 --mode sar --sf-input argmax

The tokenizer is the real FlexVAE architecture with random weights (it costs what the trained one costs)
unless --vae is given. A step = tokenize the batch + the mode's loss + backward + clip + AdamW, exactly as
sar.py's training loop does it, on the fixed --scales list. For --mode sar it also times SAR's extra work
alone, for the floor of a SAR step: the student pass (forward + backward) and, with --sf-input cfg, the
no-grad unconditional forward. On CUDA it reports peak memory and MFU (model FLOPs / time / --peak-tflops).
Prints one line per step and a JSON summary (median over the steps after the first, which is warm-up).
--sampling times sar.sample instead: --bench-steps batches of --batch-size images (one class each), the
sampling flags (--cfg, default 2.2 as the official d16 eval, --top-k, --top-p, --scales), VAE decode included.

    python experiments/bench.py --sampling --depth 16 --batch-size 4 --image-size 256 --dtype fp32

The official side of each comparison: experiments/official_timing.py, same flags, same JSON keys (side:
"official" vs "ours"); experiments/ratio.py divides the two.
"""
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sar  # noqa: E402
import cpu_speed  # noqa: E402
from common import UserError, atomic_write  # noqa: E402
from tokenizer import VQVAE, frozen_on  # noqa: E402


def train_flops_per_image(C, D, V, scales, args):
    """Matmul FLOPs of one training image of a width-C, depth-D model with V codes: forward = 2 * (weights x
    tokens) + attention 4 * L_ctx * C per token per layer; backward = 2 x forward. SAR adds the no-grad
    unconditional pass and the student pass. official_timing.py counts the official model's work with it."""

    def fwd(s):
        ctx = sum(pn * pn * sum(q * q for q in s[:i + 1]) for i, pn in enumerate(s))
        return 2 * sum(pn * pn for pn in s) * (D * 12 * C * C + C * V) + 4 * ctx * C * D
    total = 3 * fwd(scales)
    if args.mode == 'sar':
        total += fwd(scales) if args.sf_input == 'cfg' and args.sf_cfg > 1 else 0
        last = getattr(args, 'sf_transitions', 'last') == 'last'      # (the official code has only 'last')
        total += 3 * (fwd([1, scales[-1]]) if last else fwd(scales))
    return total


def timed(fn, sync, reps):
    """Median wall time of fn() in ms over reps runs."""
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1000, 1)


def setup(args, drop_path_rate=None):
    """(device, tokenizer, FlexVAR with random weights): --vae, or the real FlexVAE architecture."""
    device = sar.setup_distributed(args.device)[2]
    torch.manual_seed(args.seed)
    vae = sar.load_tokenizer(args.vae, device, args.trust_checkpoint) if args.vae else \
        frozen_on(VQVAE(), device)
    V, Cv = vae.codebook().shape
    model = sar.FlexVAR(args.depth, V, 1000, Cv, drop_path_rate).init_weights().to(device)
    return device, vae, cpu_speed.apply(model)              # threads, memory, kernels: as sar.py does


def write_profile(fn, sync, device, path):
    """One more call of fn under torch.profiler; its 40 costliest ops and kernels (self time on the device
    for CUDA, on the CPU otherwise) as a text table to path: where the time of a step goes."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        sync()
        wall = (time.perf_counter() - t) * 1000
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
    # busy time far below the wall time = the device waits for Python to launch its kernels
    kernels = [e for e in prof.events() if e.device_type.name == 'CUDA']
    head = (f"wall {wall:.1f} ms (profiled); the GPU busy {sum(e.self_device_time_total for e in kernels) / 1000:.1f}"
            f" ms in {len(kernels)} kernels\n" if kernels else
            f"wall {wall:.1f} ms (profiled); {sum(e.name.startswith('aten::') for e in prof.events())} aten ops\n")
    atomic_write(path, lambda f: f.write((head + table).encode()))
    print(f"profile of one step -> {path}", flush=True)


def bench(args):
    device, vae, model = setup(args)
    model.train()
    opt = sar.make_optimizer(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, init_scale=2. ** 11, enabled=args.dtype == 'fp16')
    loss_fn = sar.loss_for(args, vae, model.num_classes)
    for block in model.blocks if args.compile else []:   # as sar.py's training loop does it
        block.compile(dynamic=True)
    B, scales = args.batch_size, list(args.scales)
    images = torch.rand(B, 3, args.image_size, args.image_size, device=device) * 2 - 1
    labels = torch.randint(0, model.num_classes, (B,), device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()

    def step(i):
        gen = torch.Generator(device=device).manual_seed(i)
        gt_idx, x_in = sar.gt_tokens_and_inputs(vae, images, scales)
        with sar.autocast_ctx(device, args.dtype):
            loss, _ = loss_fn(model, gt_idx, x_in, labels, scales, gen)
        scaler.scale(loss).backward()
        sar.optimizer_step(model, opt, scaler, args.grad_clip)

    times = []
    for i in range(args.bench_steps):
        times.append(timed(lambda: step(i), sync, 1))
        print(f"step {i}: {times[-1]:.1f} ms{' (warm-up)' if i == 0 else ''}", flush=True)
    if args.profile:
        write_profile(lambda: step(args.bench_steps), sync, device, args.profile)
    med = statistics.median(times[1:] or times)
    res = dict(side='ours', depth=args.depth, params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               batch=B, mode=args.mode, sf_input=args.sf_input if args.mode == 'sar' else None, scales=scales,
               image_size=args.image_size, device=str(device), dtype=args.dtype, compile=args.compile,
               ms_per_step=med, min_ms=min(times[1:] or times), images_per_s=round(B * 1000 / med, 2))
    if args.mode == 'sar':  # SAR's extra work alone: the floor of a SAR step is TF step + these
        gt_idx, x_in = sar.gt_tokens_and_inputs(vae, images, scales)
        drawn = dict(enumerate(gt_idx))        # stand-in tokens: the cost does not depend on their values

        def student():
            with sar.autocast_ctx(device, args.dtype):
                sf_logits, which = sar.student_pass(model, vae, labels, drawn, scales, args.sf_transitions)
                loss = sar.token_ce(sf_logits, torch.cat([drawn[i] for i in which], 1))
            loss.backward()
            model.zero_grad(set_to_none=True)

        def uncond():
            with torch.no_grad(), sar.autocast_ctx(device, args.dtype):
                model(torch.full_like(labels, model.num_classes), x_in, scales)
        res['student_pass_ms'] = timed(student, sync, 3)
        res['nograd_forward_ms'] = timed(uncond, sync, 3)
    return report(res, device, train_flops_per_image(model.C, model.depth, model.V, scales, args), args)


def report(res, device, flops_per_image, args):
    """Peak memory, and on CUDA the MFU of res['ms_per_step'], into res; printed as the one JSON line that
    both sides (bench.py, official_timing.py) end with."""
    if device.type == 'cuda':
        res['peak_mem_GiB'] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        flops_per_s = flops_per_image * res['batch'] / (res['ms_per_step'] / 1000)
        res['mfu'] = round(flops_per_s / (args.peak_tflops * 1e12), 4)
    else:
        import resource
        res['peak_rss_GiB'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    print(json.dumps(res))
    return res


@torch.no_grad()
def bench_sampling(args):
    device, vae, model = setup(args, drop_path_rate=0.0)
    model.eval()
    labels = torch.arange(args.batch_size, device=device) % model.num_classes
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    cfg = 2.2 if args.cfg is None else args.cfg
    times = []

    def one(i):
        gen = torch.Generator(device=device).manual_seed(i)
        with sar.autocast_ctx(device, args.dtype):
            sar.sample(model, vae, labels, list(args.scales), cfg, args.top_k, args.top_p, gen, args.cfg_form)
    for i in range(args.bench_steps):
        times.append(timed(lambda: one(i), sync, 1))
        print(f"batch {i}: {times[-1]:.1f} ms{' (warm-up)' if i == 0 else ''}", flush=True)
    if args.profile:
        write_profile(lambda: one(args.bench_steps), sync, device, args.profile)
    med = statistics.median(times[1:] or times)
    res = dict(side='ours', depth=args.depth, batch=args.batch_size, scales=list(args.scales), cfg=cfg,
               top_k=args.top_k, top_p=args.top_p, device=str(device), dtype=args.dtype,
               s_per_batch=round(med / 1000, 3), images_per_s=round(args.batch_size * 1000 / med, 3))
    print(json.dumps(res))
    return res


def get_parser(description):
    """sar.py's flags (same defaults, so the same flags mean the same run) + the benchmark's own; official_timing.py
    uses it too."""
    p = sar.get_parser()
    p.description = description
    p.add_argument('--bench-steps', type=int, default=6, help="timed steps (the first is warm-up, excluded)")
    p.add_argument('--peak-tflops', type=float, default=989.0, help="peak for MFU (H100 bf16 dense: 989)")
    p.add_argument('--sampling', action='store_true', help="time sampling (VAE decode included) instead")
    p.add_argument('--profile', metavar='FILE', help="then profile one more step (or batch) into FILE (a table)")
    return p


def parse(p, argv):
    """The flags, with sar.py's size defaults filled in; bad values are a UserError."""
    args = p.parse_args(argv)
    if args.bench_steps < 1:
        raise UserError(f"--bench-steps must be >= 1, got {args.bench_steps}")
    vae = args.vae                 # no --vae: the FlexVAE architecture with random weights, not out/
    args = sar.resolve_args(args)
    args.vae = vae
    return args


def main(argv=None):
    try:
        args = parse(get_parser(__doc__.split('\n\n')[1]), argv)
        return bench_sampling(args) if args.sampling else bench(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
