"""
The GPU comparison of docs/benchmarks.md in one run: the official code and ours side by side (A B A B) on the
d16 training steps and the sampler, then the laptop pipeline and the DDP path of one process; writes the medians
to assets/bench/gpu.json.

    python experiments/gpu_bench.py --official /path/to/SAR                 # on a CUDA machine
    python experiments/gpu_bench.py --official /path/to/SAR --tiny --parts ab --json /tmp/gpu.json   # dry run

/path/to/SAR is a clone of the official code (GengzeZhou/SAR). It runs in parts (--parts, default ab,laptop):

ab        each round runs, for every row, the official side (experiments/official_timing.py) and then ours
          (experiments/bench.py) with the same flags, each in a fresh process, so neither inherits the other's
          allocator or compiled kernels:
              tf            --mode tf                          ms_per_step
              sar_argmax    --mode sar --sf-input argmax       ms_per_step
              sar_cfg       --mode sar --sf-input cfg          ms_per_step (the official recipe)
              sampling      --sampling (cfg 2.2, decode incl.)  images_per_s
          Configuration: d16, batch 32, 256 px, scales 1,2,3,4,5,6,8,10,13,16, bf16 autocast, random weights,
          6 steps of which the first is warm-up (each side reports the median of the others). Round 1's runs of
          ours also write torch.profiler's table of one more step: gpu_profile_tf.txt, gpu_profile_sampling.txt
          (next to the JSON; their first line: wall time vs the time the GPU was busy, and the kernel count).
laptop    `bash train.sh` end to end into a temporary folder, timed; one TF step of its depth-4 model profiled
          (gpu_profile_laptop_tf.txt: is the small model waiting on kernel launches?); 3 SAR steps from its TF
          checkpoint under `torchrun --nproc_per_node 1` (the DDP path: nccl on a GPU; `ddp_start_line` holds
          sar.py's start line, which names the backend).
compiled  ours alone with --compile (each block compiled, as `sar.py --compile`) on the tf and sar_cfg rows, one
          run each (the first step compiles: minutes): `compiled` in the JSON, with the ratio to the official
          median of the same file. Not in the default: it decides whether compiling should be the CUDA default.

The JSON holds every run's numbers, the median of both sides per row, the ratios (`tf_ratio`,
`sar_argmax_ratio`, `sar_cfg_ratio`: ours / official time; `sampling_speedup`: ours / official images/s),
`mfu_tf` (a fraction, bench.py's FLOP count), `laptop_pipeline_s`, the card, torch, commit and date.
--update adds the parts run now to an existing JSON of the same commit and card (a part per command, when one
command may run only so long). --tiny: a dry run of the same script (depth 1, 32 px) on a machine without a GPU.
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


def compare(official, base, rounds, prefix, log):
    """{row: {'official': [runs], 'ours': [runs]}}, in the order official, ours, official, ours, ...
    Round 1's runs of ours on the tf and sampling rows also profile one more step into prefix + row + '.txt'."""
    runs = {row: {'official': [], 'ours': []} for row in ROWS}
    for r in range(rounds):
        for row, flags in ROWS.items():
            for side in ('official', 'ours'):
                profiled = r == 0 and side == 'ours' and row in ('tf', 'sampling')
                extra = ['--profile', f'{prefix}{row}.txt'] if profiled else []
                res = run_side(side, base + flags + extra, official)
                runs[row][side].append(res)
                log(f"round {r + 1} {row:10s} {side:8s} {key_of(row)} {res[key_of(row)]}")
    return runs


def compiled(official_medians, base, log):
    """Ours with --compile on the tf and sar_cfg rows, one run each: {row: {ms_per_step, ratio}} (the ratio to
    the official median of the same JSON, when there is one)."""
    out = {}
    for row in ('tf', 'sar_cfg'):
        res = run_side('ours', base + ROWS[row] + ['--compile'], None)
        off = (official_medians or {}).get(row, {}).get('official')
        out[row] = dict(ms_per_step=res['ms_per_step'], ratio=round(res['ms_per_step'] / off, 3) if off else None,
                        mfu=res.get('mfu'), peak_mem_GiB=res.get('peak_mem_GiB'))
        log(f"compiled {row:10s} ours ms_per_step {res['ms_per_step']}")
    return out


def last_line(p):
    return (p.stderr.strip().splitlines() or ['no output'])[-1]


def laptop_pipeline(prefix, tiny, log):
    """`bash train.sh` end to end in a temporary folder, timed; one TF step of its model profiled into
    prefix + 'laptop_tf.txt'; then 3 SAR steps from its TF checkpoint under `torchrun --nproc_per_node 1` (the
    DDP code path: nccl on a GPU). Returns {laptop_pipeline_s, laptop_split (train.sh's stage split),
    laptop_table, laptop_tf_ms (bench.py's TF step of the pipeline's configuration), ddp_start_line}."""
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
        same = ['--vae', a['vae'], '--depth', str(a['depth']), '--image-size', str(a['image_size']),
                '--scales', ','.join(map(str, a['scales'])), '--batch-size', str(a['batch_size'])]
        step = run_side('ours', same + ['--mode', 'tf', '--bench-steps', '2' if tiny else '6',
                                        '--profile', prefix + 'laptop_tf.txt'], None)
        log(f"laptop TF step {step['ms_per_step']} ms")
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', 'sar.py',
               '--mode', 'sar', '--init', os.path.join(out, 'tf', 'ckpt.pt'), '--data', a['data'], *same,
               '--steps', '3', '--out-dir', os.path.join(out, 'ddp'), '--quiet']
        d = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if d.returncode != 0:
            raise UserError(f"torchrun of 1 process failed (exit {d.returncode}): {last_line(d)}")
        start = [ln for ln in (d.stdout + d.stderr).splitlines() if ' DDP ' in ln]
        log(f"torchrun, 1 process: {start[-1] if start else 'no DDP start line'}")
    return dict(laptop_pipeline_s=s, laptop_split=split[-1] if split else None, laptop_tf_ms=step['ms_per_step'],
                ddp_start_line=start[-1] if start else None,
                laptop_table='\n'.join(ln for ln in p.stdout.splitlines() if ln.startswith('|')))


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
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '.',
                            ':(exclude)assets/bench'], cwd=ROOT,         # results written here are no code
                           capture_output=True, text=True).stdout.strip()
    commit = f"{commit}-dirty" if commit and dirty else commit     # numbers of uncommitted code say so
    return dict(card=card, torch=torch.__version__, commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))


def previous(path, now):
    """The JSON that --update adds to: it must exist and be of the same commit and card as this run."""
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--update: cannot read {path} ({type(e).__name__}); run without --update first")
    for k in ('commit', 'card', 'config'):
        if res.get(k) != now[k]:
            what = 'another configuration (--tiny or not)' if k == 'config' else \
                f"{k} {res.get(k)!r}, not {now[k]!r}"
            raise UserError(f"--update: {path} holds {what}: run without --update")
    res.setdefault('parts', {})
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--official', required=True, help="a clone of the official code (GengzeZhou/SAR)")
    p.add_argument('--parts', default='ab,laptop', help="which parts, comma-separated: ab, laptop, compiled")
    p.add_argument('--rounds', type=int, default=2, help="rounds of A B (official, ours) per row")
    p.add_argument('--tiny', action='store_true', help="a dry run at depth 1, 32 px, on the CPU")
    p.add_argument('--update', action='store_true', help="add these parts to the --json of an earlier run")
    p.add_argument('--json', default=os.path.join(ROOT, 'assets', 'bench', 'gpu.json'), help="where to write")
    args = p.parse_args(argv)
    try:
        parts = args.parts.split(',')
        if args.rounds < 1 or set(parts) - {'ab', 'laptop', 'compiled'}:
            raise UserError(f"--rounds must be >= 1 and --parts a list of ab, laptop, compiled; got "
                            f"--rounds {args.rounds} --parts {args.parts}")
        if not os.path.isfile(os.path.join(args.official, 'trainer.py')):
            raise UserError(f"--official {args.official}: not a clone of the official SAR code (no trainer.py)")
        check_writable(args.json, '--json')      # before ten minutes of timing, not after
        log = lambda msg: print(msg, flush=True)  # noqa: E731
        base = TINY if args.tiny else FULL
        res = dict(machine(), config=base)
        res = dict(previous(args.json, res), **res) if args.update else dict(res, parts={})
        prefix = os.path.splitext(args.json)[0] + '_profile_'
        if 'ab' in parts:
            res['runs'] = compare(args.official, base, args.rounds, prefix, log)
            res.update(summary(res['runs']), rounds=args.rounds)
        if 'laptop' in parts:
            res.update(laptop_pipeline(prefix, args.tiny, log))
        if 'compiled' in parts:
            res['compiled'] = compiled(res.get('medians'), base, log)
        res['parts'].update(dict.fromkeys(parts, res['date']))     # which part was measured when
        atomic_write(args.json, lambda f: f.write(json.dumps(res, indent=1).encode()))
        log(json.dumps({k: v for k, v in res.items() if k not in ('runs', 'laptop_table')}))
        return res
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
