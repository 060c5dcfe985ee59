"""
The GPU comparison of docs/benchmarks.md in one run: the official code and ours side by side (A B A B) on the
d16 training steps and the sampler, then the laptop pipeline and the DDP path of one process; writes the medians
to assets/bench/gpu.json.

    python experiments/gpu_bench.py --official /path/to/SAR                 # on a CUDA machine
    python experiments/gpu_bench.py --official /path/to/SAR --tiny --no-laptop --json /tmp/gpu.json   # dry run

/path/to/SAR is a clone of the official code (GengzeZhou/SAR). Each round runs, for every row, the official
side (experiments/official_timing.py) and then ours (experiments/bench.py) with the same flags, each in a
fresh process, so neither inherits the other's allocator or compiled kernels:

    tf            --mode tf                          ms_per_step
    sar_argmax    --mode sar --sf-input argmax       ms_per_step
    sar_cfg       --mode sar --sf-input cfg          ms_per_step (the official recipe)
    sampling      --sampling (cfg 2.2, decode incl.)  images_per_s

Configuration: d16, batch 32, 256 px, scales 1,2,3,4,5,6,8,10,13,16, bf16 autocast, random weights, 6 steps of
which the first is warm-up (each side reports the median of the others). Then `bash train.sh` end to end into a
temporary folder, timed, and 3 SAR steps from its TF checkpoint under `torchrun --nproc_per_node 1` (the DDP
path: nccl on a GPU; `ddp_start_line` holds sar.py's start line, which names the backend).

The JSON holds every run's numbers, the median of both sides per row, the ratios (`tf_ratio`,
`sar_argmax_ratio`, `sar_cfg_ratio`: ours / official time; `sampling_speedup`: ours / official images/s),
`mfu_tf` (a fraction, bench.py's FLOP count), `laptop_pipeline_s`, the card, torch, commit and date; next to
it, gpu_profile_tf.txt: torch.profiler's table of one of our TF steps (where the time goes).
--tiny: a dry run of the same script (depth 1, 32 px) on a machine without a GPU, in under a minute.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from common import UserError, atomic_write, check_writable, error_line  # noqa: E402

ROWS = {'tf': ['--mode', 'tf'], 'sar_argmax': ['--mode', 'sar', '--sf-input', 'argmax'],
        'sar_cfg': ['--mode', 'sar', '--sf-input', 'cfg'], 'sampling': ['--sampling']}
FULL = ['--depth', '16', '--batch-size', '32', '--image-size', '256', '--scales', '1,2,3,4,5,6,8,10,13,16',
        '--dtype', 'bf16', '--bench-steps', '6', '--device', 'cuda']
TINY = ['--depth', '1', '--batch-size', '2', '--image-size', '32', '--scales', '1,2', '--dtype', 'fp32',
        '--bench-steps', '2', '--device', 'cpu']


def run_side(side, flags, official):
    """One process of one side; returns its JSON line (the last line of its output) as a dict."""
    script = 'official_timing.py' if side == 'official' else 'bench.py'
    cmd = [sys.executable, os.path.join(HERE, script)] + (['--official', official] if side == 'official' else [])
    p = subprocess.run(cmd + flags, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise UserError(f"{script} {' '.join(flags)} failed (exit {p.returncode}): {last_line(p)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def key_of(row):
    return 'images_per_s' if row == 'sampling' else 'ms_per_step'


def compare(official, base, rounds, profile, log):
    """{row: {'official': [runs], 'ours': [runs]}}, in the order official, ours, official, ours, ...
    Our first TF run also profiles one more step (after its timed ones) into the file `profile`."""
    runs = {row: {'official': [], 'ours': []} for row in ROWS}
    for r in range(rounds):
        for row, flags in ROWS.items():
            for side in ('official', 'ours'):
                extra = ['--profile', profile] if (r, row, side) == (0, 'tf', 'ours') else []
                res = run_side(side, base + flags + extra, official)
                runs[row][side].append(res)
                log(f"round {r + 1} {row:10s} {side:8s} {key_of(row)} {res[key_of(row)]}")
    return runs


def last_line(p):
    return (p.stderr.strip().splitlines() or ['no output'])[-1]


def laptop_pipeline(log):
    """`bash train.sh` end to end in a temporary folder, timed, then 3 SAR steps from its TF checkpoint under
    `torchrun --nproc_per_node 1` (the DDP code path: nccl on a GPU). Returns {laptop_pipeline_s,
    laptop_split (train.sh's stage split), laptop_table, ddp_start_line (sar.py's line naming the backend)}."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        p = subprocess.run(['bash', os.path.join(ROOT, 'train.sh')], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, OUT=out))
        s = round(time.time() - t0, 1)
        if p.returncode != 0:
            raise UserError(f"train.sh failed (exit {p.returncode}): {last_line(p)}")
        split = [ln for ln in p.stdout.splitlines() if ln.startswith('time per stage')]
        log(f"laptop pipeline {s} s; {split[-1] if split else ''}")
        import torch
        a = torch.load(os.path.join(out, 'tf', 'ckpt.pt'), map_location='cpu', weights_only=True)['args']
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', 'sar.py',
               '--mode', 'sar', '--init', os.path.join(out, 'tf', 'ckpt.pt'), '--vae', a['vae'], '--data', a['data'],
               '--depth', str(a['depth']), '--image-size', str(a['image_size']), '--scales',
               ','.join(map(str, a['scales'])), '--batch-size', str(a['batch_size']), '--steps', '3',
               '--out-dir', os.path.join(out, 'ddp'), '--quiet']
        d = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if d.returncode != 0:
            raise UserError(f"torchrun of 1 process failed (exit {d.returncode}): {last_line(d)}")
        start = [ln for ln in (d.stdout + d.stderr).splitlines() if ' DDP ' in ln]
        log(f"torchrun, 1 process: {start[-1] if start else 'no DDP start line'}")
    return dict(laptop_pipeline_s=s, laptop_split=split[-1] if split else None, ddp_start_line=start[-1] if start
                else None, laptop_table='\n'.join(ln for ln in p.stdout.splitlines() if ln.startswith('|')))


def summary(runs):
    """Medians per row and side, and the keys the benchmark page quotes."""
    med = {row: {side: statistics.median(r[key_of(row)] for r in rs) for side, rs in sides.items()}
           for row, sides in runs.items()}
    out = {'medians': med}
    for row in ('tf', 'sar_argmax', 'sar_cfg'):
        out[f'{row}_ratio'] = round(med[row]['ours'] / med[row]['official'], 3)
    out['sampling_speedup'] = round(med['sampling']['ours'] / med['sampling']['official'], 3)
    mfu = [r['mfu'] for r in runs['tf']['ours'] if 'mfu' in r]          # bench.py reports MFU on CUDA only
    out['mfu_tf'] = statistics.median(mfu) if mfu else None
    return out


def machine():
    import torch
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or None
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    commit = f"{commit}-dirty" if commit and dirty else commit     # numbers of uncommitted code say so
    return dict(card=card, torch=torch.__version__, commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--official', required=True, help="a clone of the official code (GengzeZhou/SAR)")
    p.add_argument('--rounds', type=int, default=2, help="rounds of A B (official, ours) per row")
    p.add_argument('--tiny', action='store_true', help="a dry run at depth 1, 32 px, on the CPU")
    p.add_argument('--no-laptop', action='store_true', help="skip the timed `bash train.sh`")
    p.add_argument('--json', default=os.path.join(ROOT, 'assets', 'bench', 'gpu.json'), help="where to write")
    args = p.parse_args(argv)
    try:
        if args.rounds < 1:
            raise UserError(f"--rounds must be >= 1, got {args.rounds}")
        check_writable(args.json, '--json')      # before ten minutes of timing, not after
        log = lambda msg: print(msg, flush=True)  # noqa: E731
        res = dict(machine(), config=TINY if args.tiny else FULL, rounds=args.rounds)
        profile = os.path.splitext(args.json)[0] + '_profile_tf.txt'
        runs = compare(args.official, TINY if args.tiny else FULL, args.rounds, profile, log)
        res.update(summary(runs))
        res.update(dict.fromkeys(['laptop_pipeline_s', 'laptop_split', 'laptop_table', 'ddp_start_line'])
                   if args.no_laptop else laptop_pipeline(log))
        res['runs'] = runs
        atomic_write(args.json, lambda f: f.write(json.dumps(res, indent=1).encode()))
        log(json.dumps({k: v for k, v in res.items() if k not in ('runs', 'laptop_table')}))
        return res
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
