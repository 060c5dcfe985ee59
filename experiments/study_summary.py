"""Summarise the study runs: results.json, results.csv and a mean +- std table per dataset.
    python experiments/study_summary.py out/study 16     # the study folder and its batch size (for s/step)
"""
import csv, glob, json, os, statistics, sys
out, batch = sys.argv[1], int(sys.argv[2])
rows = []
for ev in sorted(glob.glob(os.path.join(out, '*', '*', 's*', 'eval.json'))):
    run = os.path.dirname(ev)
    ds, variant, seed = run.split(os.sep)[-3:]
    e, dg = json.load(open(ev)), json.load(open(os.path.join(run, 'diagnose.json')))
    logs = [json.loads(line) for line in open(os.path.join(run, 'log.jsonl'))]
    # the first log interval holds the warm-up
    speed = [r['imgs_per_s'] for r in logs[1:]] or [r['imgs_per_s'] for r in logs]
    row = dict(dataset=ds, variant=variant, seed=int(seed[1:]), fid=e['fid'], acc=e['acc'],
               s_per_step=batch / statistics.median(speed))
    row.update({f'ce_{k}': v for k, v in dg['token_mean_ce'].items()})
    for kind in ('teacher', 'rollout'):
        row.update({f'{kind}_ce_{pn}': v['ce'] for pn, v in dg['per_scale'][kind].items()})
    rows.append(row)
commit_file = os.path.join(out, 'commit.txt')
commit = open(commit_file).read().strip() if os.path.isfile(commit_file) else None
json.dump(dict(commit=commit, runs=rows), open(os.path.join(out, 'results.json'), 'w'), indent=1)
with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
ms = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
cols = ['fid', 'acc', 'ce_teacher', 'ce_ssr', 'ce_rollout', 's_per_step']
for ds in dict.fromkeys(r['dataset'] for r in rows):
    print(f"\n{ds} (commit {commit}): mean ± std over seeds\n| variant | seeds | " + ' | '.join(cols) + ' |')
    print('|---|---|' + '---|' * len(cols))
    for v in dict.fromkeys(r['variant'] for r in rows if r['dataset'] == ds):
        rs = [r for r in rows if r['dataset'] == ds and r['variant'] == v]
        print(f"| {v} | {len(rs)} | " + ' | '.join(ms([r[c] for r in rs]) for c in cols) + ' |')
