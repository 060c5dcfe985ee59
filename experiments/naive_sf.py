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
rollout; hybrid@k: scales of side <= k stay teacher-forced, finer ones come from the rollout. The rollout is
sar.py's sampler; its tokens are drawn as sar.py's --sf-input says (argmax, sampling, or sampling with the
inference CFG ramp), greedy at sides off the official sampling grid, as at inference.
"""
import argparse
import functools
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sar  # noqa: E402
from common import ArgumentParser, UserError, load_checkpoint  # noqa: E402


def naive_sf_inputs(model, vae, gt_idx, labels, scales, schedule, hybrid_k, draw, gen):
    """Eq. (3): the inputs (B, L - pn_0^2, Cv) of a naive student-forcing step. The input of scale i+1 is made
    from map i, so keeping map i at the ground truth teacher-forces scale i+1. The other maps come from the
    sampler's own rollout (sar.generate_tokens, in eval mode, the kept maps given), drawn as `draw` says."""
    K = len(scales)
    if schedule == 'interleave':
        keep = [i for i in range(K - 1) if i % 2 == 1]        # map i feeds the 1-based scale i+2
    elif schedule == 'hybrid':
        keep = [i for i in range(K - 1) if scales[i + 1] <= hybrid_k]
    else:
        keep = []
    was_training = model.training
    own, _ = sar.generate_tokens(model.eval(), vae, labels, scales, draw.cfg if draw.input == 'cfg' else None,
                                 1 if draw.input == 'argmax' else draw.top_k, draw.top_p, gen,
                                 given={i: gt_idx[i] for i in keep})
    model.train(was_training)
    return sar.tf_input(vae, own, scales)


class NaiveSFLoss:
    """The training loss of a naive-SF run: eq. (2)'s cross entropy on rollout inputs. Counts its calls, so
    'alternate' knows the step (teacher forcing on even steps), also after --resume."""

    def __init__(self, args, vae, num_classes, schedule, hybrid_k):
        self.vae, self.args, self.schedule, self.hybrid_k = vae, args, schedule, hybrid_k
        self.tf = functools.partial(sar.tf_loss, num_classes=num_classes, cond_drop=args.cond_drop)
        ckpt = os.path.join(args.out_dir, 'ckpt.pt')
        resumed = args.resume and os.path.isfile(ckpt)        # read with the project's checked loader
        start = load_checkpoint(ckpt, args.trust_checkpoint).get('step', 0) if resumed else 0
        self.calls = start * args.grad_accum

    def __call__(self, model, gt_idx, x_in, labels, scales, gen=None):
        step, self.calls = self.calls // self.args.grad_accum, self.calls + 1
        if not (self.schedule == 'alternate' and step % 2 == 0):
            a, raw = self.args, getattr(model, 'module', model)       # the rollout runs on the bare module
            draw = sar.SFDraw(a.sf_input, a.sf_top_k, a.sf_top_p, a.sf_cfg)
            x_in = naive_sf_inputs(raw, self.vae, gt_idx, labels, scales, self.schedule, self.hybrid_k, draw, gen)
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
