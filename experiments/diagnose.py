"""
The exposure-bias diagnostic (paper section 3): how much worse a checkpoint predicts each scale when its
inputs are its own outputs instead of the ground truth.

    python experiments/diagnose.py --ckpt out/sar/ckpt.pt --data toy --images 1000     # -> diagnose.json

For held-out images, per scale, the cross entropy and accuracy against the GT tokens, for three inputs:
  teacher  the GT token maps (training, eq. 2);
  ssr      each map drawn from the model's own teacher-forced prediction of it, as --sf-input says (the inputs
           of SAR's 'all' transitions, eq. 5): one step off the GT hierarchy;
  rollout  the model's free-running generation with the sampling flags (--cfg, --top-k, --top-p): what
           inference sees. teacher -> rollout is the train-test gap SAR is meant to shrink.
Sampling and SF flags are sar.py's (python sar.py --help).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sar  # noqa: E402
import cpu_speed  # noqa: E402
from common import UserError, atomic_write, check_writable, step_seed  # noqa: E402
from data import load_dataset  # noqa: E402


@torch.no_grad()
def per_scale_stats(logits_BLV, target_BL, scales):
    """{pn: (cross entropy, token accuracy)} of each scale's tokens."""
    ce = F.cross_entropy(logits_BLV.flatten(0, 1).float(), target_BL.flatten(), reduction='none')
    ce, acc = ce.view(target_BL.shape), (logits_BLV.argmax(-1) == target_BL).float()
    return {pn: (ce[:, a:b].mean().item(), acc[:, a:b].mean().item())
            for pn, (a, b) in zip(scales, sar.begin_ends(scales))}


@torch.no_grad()
def exposure_bias(model, vae, gt_idx, labels, scales, input_idx):
    """Per-scale (CE, accuracy) against the GT tokens when every scale's input is built from the token maps
    `input_idx` (the GT maps: teacher forcing; the model's own maps: what it sees at inference)."""
    logits = model(labels, sar.tf_input(vae, input_idx, scales), scales)
    return per_scale_stats(logits, torch.cat(gt_idx, dim=1), scales)


def diagnose(args):
    device = sar.setup_distributed(args.device)[2]
    model, vae, ours = sar.load_for_sampling(args.ckpt, args.vae, device, args.trust_checkpoint)
    model = cpu_speed.apply(model)                           # as sar.py's sampling command does
    scales = args.scales or (ours['scales'] if ours else list(sar.OFFICIAL_SCALES))
    cfg = 1.5 if args.cfg is None else args.cfg
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.ckpt))
    check_writable(os.path.join(out_dir, 'diagnose.json'), '--out-dir')
    data = load_dataset(args.data, scales[-1] * vae.downsample, 'val')
    n, K = min(args.images, len(data)), len(scales)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(n)), args.sample_batch)
    sums = {kind: {pn: [0.0, 0.0] for pn in scales} for kind in ('teacher', 'ssr', 'rollout')}
    from tqdm import tqdm
    for b, (images, labels) in enumerate(tqdm(loader, disable=args.quiet, desc='diagnose')):
        images, labels = images.to(device), labels.to(device)
        gen = torch.Generator(device=device).manual_seed(step_seed(args.seed, b))
        with torch.no_grad(), sar.autocast_ctx(device, args.dtype):
            gt_idx, x_in = sar.gt_tokens_and_inputs(vae, images, scales)
            logits = model(labels, x_in, scales)
            draw = sar.SFDraw(args.sf_input, args.sf_top_k, args.sf_top_p, args.sf_cfg)
            drawn = sar.ssr_draw(model, logits, x_in, labels, model.num_classes, scales, range(K), draw,
                                 gen)
            own, _ = sar.generate_tokens(model, vae, labels, scales, cfg, args.top_k, args.top_p, gen,
                                         args.cfg_form)
            stats = dict(teacher=per_scale_stats(logits, torch.cat(gt_idx, dim=1), scales),  # = with gt
                         ssr=exposure_bias(model, vae, gt_idx, labels, scales, [drawn[i] for i in range(K)]),
                         rollout=exposure_bias(model, vae, gt_idx, labels, scales, own))
        for kind, per in stats.items():
            for pn, (ce, acc) in per.items():
                sums[kind][pn][0] += ce * len(labels)
                sums[kind][pn][1] += acc * len(labels)
    L = sum(pn * pn for pn in scales)
    res = dict(ckpt=os.path.abspath(args.ckpt), images=n, scales=scales, cfg=cfg, top_k=args.top_k,
               top_p=args.top_p, sf_input=args.sf_input, per_scale={}, token_mean_ce={})
    for kind, d in sums.items():
        res['per_scale'][kind] = {str(pn): dict(ce=round(c / n, 4), acc=round(a / n, 4))
                                  for pn, (c, a) in d.items()}
        res['token_mean_ce'][kind] = round(sum(d[pn][0] / n * pn * pn for pn in scales) / L, 4)
    print(f"exposure bias of {args.ckpt} on {n} held-out images (CE / accuracy vs the GT tokens)")
    print(f"{'scale':>5} | {'teacher':>15} | {'ssr':>15} | {'rollout':>15}")
    for pn in scales:
        print(f"{pn:>5} | " + " | ".join(f"{res['per_scale'][k][str(pn)]['ce']:7.3f} "
                                        f"{res['per_scale'][k][str(pn)]['acc']:6.1%}" for k in sums))
    print(f"{'mean':>5} | " + " | ".join(f"{res['token_mean_ce'][k]:7.3f} {'':6}" for k in sums))
    path = os.path.join(out_dir, 'diagnose.json')
    atomic_write(path, lambda f: f.write(json.dumps(res, indent=1).encode()))
    print(f"wrote {path}")
    return res


def main(argv=None):
    p = sar.get_parser()
    p.description = __doc__.split('\n\n')[1]
    p.add_argument('--images', type=int, default=1000, help="held-out images to evaluate (the 'val' split)")
    try:
        args = p.parse_args(argv)
        if not args.ckpt:
            raise UserError("--ckpt CKPT is required (e.g. out/sar/ckpt.pt)")
        if args.images < 1:
            raise UserError(f"--images must be >= 1, got {args.images}")
        args.sample = True           # resolve the sampling defaults
        diagnose(sar.resolve_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
