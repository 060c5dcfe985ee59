"""
Naive student forcing (paper section 4.1, eq. 3, Table 3): the ablation that SAR replaces.

Every training input is built from the model's *own* autoregressive rollout (no gradient; K sequential passes,
which is what makes naive student forcing slow), and the model is trained on it with the ground-truth targets
of eq. (2). The rollout has drifted from the GT hierarchy, so those targets contradict the inputs: the paper's
explanation of why naive SF hurts, and what SAR's teacher-forced CSF target avoids.

    python experiments/naive_sf.py --schedule full --init out/tf/ckpt.pt --steps 60 --out-dir out/sf_full
    python experiments/naive_sf.py --schedule hybrid --hybrid-k 4 ...        # any sar.py training flag works

Schedules (Table 3): full: every input from the rollout; alternate: teacher forcing and full SF on alternating
steps; interleave: the inputs of the 1-based odd scales stay teacher-forced, the even ones come from the
rollout; hybrid@k: scales of side <= k stay teacher-forced, finer ones come from the rollout. Rollout tokens
are drawn as sar.py's --sf-input says (argmax, sampling, or sampling with the inference CFG ramp).
"""
import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sar  # noqa: E402
from common import ArgumentParser, UserError  # noqa: E402


@torch.no_grad()
def rollout(model, vae, labels, scales, keep, top_k, top_p, cfg=None, generator=None):
    """sar.generate_tokens' KV-cached loop, where the token maps in `keep` ({scale index: (B, pn^2)}) replace
    the drawn ones, and every scale is sampled (the official sampling grid is for inference, not training)."""
    was_training = model.training
    model.eval()
    B, K = labels.shape[0], len(scales)
    rows = labels if cfg is None else torch.cat((labels, torch.full_like(labels, model.num_classes)))
    cond_BC = model.class_emb(rows)
    x = model.embed(rows, None, scales[:1])[0]
    caches = [dict() for _ in model.blocks]
    maps = []
    for si, pn in enumerate(scales):
        for block, cache in zip(model.blocks, caches):
            x = block(x, cond_BC, None, cache)
        logits = model.logits(x, cond_BC)
        if cfg is not None:
            logits = sar.cfg_combine(logits[:B], logits[B:], si, K, cfg, 'var', pn)
        maps.append(keep[si] if si in keep else sar.sample_top_k_top_p(logits, top_k, top_p, generator))
        if si + 1 < K:
            x = sar.next_scale_input(model, vae, maps[-1], pn, scales[si + 1]).repeat(len(rows) // B, 1, 1)
    model.train(was_training)
    return maps


def naive_sf_inputs(model, vae, gt_idx, labels, scales, schedule, hybrid_k, sf_input, top_k, top_p, sf_cfg,
                    gen):
    """Eq. (3): the inputs (B, L - pn_0^2, Cv) of a naive student-forcing step. The input of scale i+1 is made
    from map i, so keeping map i at the ground truth teacher-forces scale i+1."""
    K = len(scales)
    if schedule == 'interleave':
        keep = [i for i in range(K - 1) if i % 2 == 1]        # map i feeds the 1-based scale i+2
    elif schedule == 'hybrid':
        keep = [i for i in range(K - 1) if scales[i + 1] <= hybrid_k]
    else:
        keep = []
    own = rollout(model, vae, labels, scales, {i: gt_idx[i] for i in keep},
                  1 if sf_input == 'argmax' else top_k, top_p, sf_cfg if sf_input == 'cfg' else None, gen)
    return sar.tf_input(vae, own, scales)


class NaiveSFLoss:
    """The training loss of a naive-SF run: eq. (2)'s cross entropy on rollout inputs. Counts its calls, so
    'alternate' knows the step (teacher forcing on even steps), also after --resume."""

    def __init__(self, args, vae, num_classes, schedule, hybrid_k):
        self.vae, self.args, self.schedule, self.hybrid_k = vae, args, schedule, hybrid_k
        self.tf = functools.partial(sar.tf_loss, num_classes=num_classes, cond_drop=args.cond_drop)
        ckpt = os.path.join(args.out_dir, 'ckpt.pt')
        start = torch.load(ckpt, weights_only=True)['step'] if args.resume and os.path.isfile(ckpt) else 0
        self.calls = start * args.grad_accum

    def __call__(self, model, gt_idx, x_in, labels, scales, gen=None):
        step, self.calls = self.calls // self.args.grad_accum, self.calls + 1
        if not (self.schedule == 'alternate' and step % 2 == 0):
            a, raw = self.args, getattr(model, 'module', model)       # the rollout runs on the bare module
            x_in = naive_sf_inputs(raw, self.vae, gt_idx, labels, scales, self.schedule, self.hybrid_k,
                                   a.sf_input, a.sf_top_k, a.sf_top_p, a.sf_cfg, gen)
        return self.tf(model, gt_idx, x_in, labels, scales, gen)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split('\n\n')[1], add_help=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--schedule', choices=['full', 'alternate', 'interleave', 'hybrid'], default='full',
                   help="which inputs come from the model's own rollout (Table 3)")
    p.add_argument('--hybrid-k', type=int, default=4, help="hybrid@k: sides <= k stay teacher-forced")
    try:
        own, rest = p.parse_known_args(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if '-h' in rest or '--help' in rest:
        p.print_help()
        print("\nEvery other flag is sar.py's (python sar.py --help); --mode keeps tf's defaults.")
        sys.exit(0)
    if not any(a == '--out-dir' or a.startswith('--out-dir=') for a in rest):
        rest += ['--out-dir', os.path.join('out', f'sf_{own.schedule}')]
    sar.main(rest, make_loss=lambda args, vae, nc: NaiveSFLoss(args, vae, nc, own.schedule, own.hybrid_k))


if __name__ == '__main__':
    main()
