"""Summarise the study runs: results.json, results.csv and a mean +- std table per dataset.
    python experiments/study_summary.py out/study 16     # the study folder and its batch size (for s/step)
The second study (experiments/study2_summary.py) reads its runs with the same functions.
"""
import csv, glob, json, os, statistics, sys


def run_metrics(eval_dir, log_path, batch):
    """One evaluated checkpoint: domain FID and class accuracy (eval.json), the exposure-bias CEs
    (diagnose.json: token-mean and per scale) and the median seconds per training step (log.jsonl)."""
    e = json.load(open(os.path.join(eval_dir, 'eval.json')))
    dg = json.load(open(os.path.join(eval_dir, 'diagnose.json')))
    logs = [json.loads(line) for line in open(log_path)]
    # the first log interval holds the warm-up
    speed = [r['imgs_per_s'] for r in logs[1:]] or [r['imgs_per_s'] for r in logs]
    row = dict(fid=e['fid'], acc=e['acc'], s_per_step=batch / statistics.median(speed))
    row.update({f'ce_{k}': v for k, v in dg['token_mean_ce'].items()})
    for kind in ('teacher', 'rollout'):
        row.update({f'{kind}_ce_{pn}': v['ce'] for pn, v in dg['per_scale'][kind].items()})
    return row


def write_results(out, rows, **extra):
    """results.json (the commit, `extra`, every row) and results.csv (every row); returns the commit."""
    commit_file = os.path.join(out, 'commit.txt')
    commit = open(commit_file).read().strip() if os.path.isfile(commit_file) else None
    json.dump(dict(commit=commit, **extra, runs=rows), open(os.path.join(out, 'results.json'), 'w'), indent=1)
    with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    return commit


def mean_std(xs, digits=3):
    """'mean ± std' over seeds (the sample std), or the one value."""
    if len(xs) < 2:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def main(out, batch):
    rows = []
    for ev in sorted(glob.glob(os.path.join(out, '*', '*', 's*', 'eval.json'))):
        run = os.path.dirname(ev)
        ds, variant, seed = run.split(os.sep)[-3:]
        rows.append(dict(dataset=ds, variant=variant, seed=int(seed[1:]),
                         **run_metrics(run, os.path.join(run, 'log.jsonl'), batch)))
    commit = write_results(out, rows)
    cols = ['fid', 'acc', 'ce_teacher', 'ce_ssr', 'ce_rollout', 's_per_step']
    for ds in dict.fromkeys(r['dataset'] for r in rows):
        print(f"\n{ds} (commit {commit}): mean ± std over seeds\n| variant | seeds | " + ' | '.join(cols) + ' |')
        print('|---|---|' + '---|' * len(cols))
        for v in dict.fromkeys(r['variant'] for r in rows if r['dataset'] == ds):
            rs = [r for r in rows if r['dataset'] == ds and r['variant'] == v]
            print(f"| {v} | {len(rs)} | " + ' | '.join(mean_std([r[c] for r in rs]) for c in cols) + ' |')


if __name__ == '__main__':
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        print("usage: " + __doc__.split('\n')[1].strip(), file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1], int(sys.argv[2]))
