"""Summarise the second study (experiments/study2.sh): results.json, results.csv, markdown tables and plots.

    python experiments/study2_summary.py out/study2 16     # the study folder and its batch size (for s/step)

study2.sh also asks it for the choices between the study's parts (per dataset folder) and for its check that
training in chunks equals one run:

    python experiments/study2_summary.py --best-gamma out/study2/toy 0.01 0.1 0.3 1.0   # -> 0.1
    python experiments/study2_summary.py --best 2 out/study2/toy tf sar_g0.01 sar_g0.1  # -> sar_g0.1 tf
    python experiments/study2_summary.py --same-weights RUN_A/ckpt.pt RUN_B/ckpt.pt

Plots are drawn with PIL alone (matplotlib is not a dependency): `chart` below is a small line chart.
"""
import glob, json, math, os, re, statistics, sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_summary import mean_std, run_metrics, write_results  # noqa: E402

PARTS = ('sweep', 'budget', 'scratch')
SETTING = re.compile(r'(tf|sar|sar_all)(?:_g([0-9.]+))?')   # folder names: tf, sar_g0.1, sar_all_g0.1
ORDER = {'tf': 0, 'sar': 1, 'sar_all': 2}                     # table and legend order


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# reading the runs; the choices study2.sh makes between its parts
# ---------------------------------------------------------------------------------------------------------
def read_points(out, batch):
    """One row per evaluation point: <out>/<dataset>/<part>/<setting>/s<seed>/at_<step>/{eval,diagnose}.json,
    with the run's s/step from its log.jsonl and the paired FID difference against TF of the same dataset,
    part, step and seed (same starting weights and data order: it cancels most of the seed-to-seed noise)."""
    rows = []
    for part in PARTS:
        for ev in sorted(glob.glob(os.path.join(out, '*', part, '*', 's*', 'at_*', 'eval.json'))):
            point = os.path.dirname(ev)
            run = os.path.dirname(point)
            ds, _, setting, seed = run.split(os.sep)[-4:]
            variant, gamma = SETTING.fullmatch(setting).groups()
            rows.append(dict(dataset=ds, part=part, setting=setting, variant=variant,
                             gamma=float(gamma) if gamma else None, seed=int(seed[1:]),
                             step=int(point.rsplit('_', 1)[1]), init='random' if part == 'scratch' else 'P',
                             **run_metrics(point, os.path.join(run, 'log.jsonl'), batch)))
    tf = {(r['dataset'], r['part'], r['step'], r['seed']): r['fid'] for r in rows if r['variant'] == 'tf'}
    for r in rows:
        base = tf.get((r['dataset'], r['part'], r['step'], r['seed']))
        r['fid_minus_tf'] = None if base is None or r['variant'] == 'tf' else r['fid'] - base
    return rows


def sweep_fids(d, setting):
    """The domain FIDs of one sweep setting of dataset folder d, one per seed."""
    evs = sorted(glob.glob(os.path.join(d, 'sweep', setting, 's*', 'at_*', 'eval.json')))
    if not evs:
        fail(f"no evaluations of {setting} under {d}/sweep")
    return [json.load(open(ev))['fid'] for ev in evs]


def best_settings(d, n, settings):
    """The n sweep settings with the lowest mean FID over the seeds, best first (ties: the order given)."""
    return sorted(settings, key=lambda s: statistics.mean(sweep_fids(d, s)))[:n]


def best_gamma(d, gammas):
    """The gamma (as written) whose SAR runs (official recipe) have the lowest mean FID over the seeds."""
    return best_settings(d, 1, [f'sar_g{g}' for g in gammas])[0].removeprefix('sar_g')


def same_weights(a, b):
    """Exit with one line unless checkpoints a and b hold the same step, weights and Adam state, bit for bit."""
    import torch
    ca, cb = (torch.load(p, map_location='cpu', weights_only=True) for p in (a, b))
    if ca['step'] != cb['step']:
        fail(f"{a} is at step {ca['step']}, {b} at step {cb['step']}")
    if ca['model'].keys() != cb['model'].keys():
        fail(f"{a} and {b} hold different models")
    pairs = [(f'model.{k}', v, cb['model'][k]) for k, v in ca['model'].items()]
    for i, st in ca['optimizer']['state'].items():
        pairs += [(f'adam.{i}.{k}', v, cb['optimizer']['state'][i][k]) for k, v in st.items()]
    differ = [(name, (x.double() - y.double()).abs().max().item())
              for name, x, y in pairs if not torch.equal(x, y)]
    if differ:
        name, worst = max(differ, key=lambda t: t[1])
        fail(f"chunked and one-shot runs differ after {ca['step']} steps: {len(differ)} of {len(pairs)} tensors, "
             f"the most in {name} (max |difference| {worst:.3g}); {a} vs {b}")
    print(f"chunked == one-shot: {len(pairs)} tensors (weights, Adam state) bit-identical "
          f"after {ca['step']} steps")


# ---------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------
def by_setting(rows):
    """{(setting, step): [rows]} in reading order: tf, then SAR by gamma, then all transitions; by step."""
    key = lambda r: (ORDER[r['variant']], r['gamma'] or 0, r['step'], r['seed'])
    groups = {}
    for r in sorted(rows, key=key):
        groups.setdefault((r['setting'], r['step']), []).append(r)
    return groups


def detectable(diffs):
    """The smallest FID difference the paired design resolves: the half-width of the 95 % t interval of the
    mean paired difference, t(0.975, n-1) x sd(d_i) / sqrt(n), over the n seeds' d_i = FID(sar, seed i) -
    FID(tf, seed i). A true effect smaller than this is not told apart from zero (t = 4.30 for 3 seeds)."""
    from scipy.stats import t
    n = len(diffs)
    return t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float('nan')


def print_table(rows, title):
    cols = [('fid', 2), ('fid_minus_tf', 2), ('acc', 3), ('ce_teacher', 3), ('ce_ssr', 3), ('ce_rollout', 3),
            ('s_per_step', 2)]
    print(f"\n{title}: mean ± std over seeds; fid_minus_tf pairs each run with tf of the same seed")
    print('| setting | step | seeds | ' + ' | '.join(c for c, _ in cols) + ' |')
    print('|---|---|---|' + '---|' * len(cols))
    for (setting, step), rs in by_setting(rows).items():
        cells = []
        for c, digits in cols:
            xs = [r[c] for r in rs if r[c] is not None]
            cell = mean_std(xs, digits) if xs else '-'
            cells.append('+' + cell if c == 'fid_minus_tf' and xs and cell[0] != '-' else cell)
        print(f"| {setting} | {step} | {len(rs)} | " + ' | '.join(cells) + ' |')


def print_tables(rows):
    for ds in dict.fromkeys(r['dataset'] for r in rows):
        for part in PARTS:
            rs = [r for r in rows if r['dataset'] == ds and r['part'] == part]
            if rs:
                print_table(rs, f"{ds}, {part}")
        sar = [r for r in rows if r['dataset'] == ds and r['part'] == 'sweep' and r['variant'] == 'sar']
        if sar:
            g = min(r['gamma'] for r in sar)
            diffs = [r['fid_minus_tf'] for r in sar if r['gamma'] == g and r['fid_minus_tf'] is not None]
            print(f"\n{ds}: smallest detectable FID difference, t(0.975, n-1) x sd / sqrt(n) of the paired tf vs sar "
                  f"(gamma {g:g}) differences over n = {len(diffs)} seeds: {detectable(diffs):.2f}")


# ---------------------------------------------------------------------------------------------------------
# plots: a line chart in PIL
# ---------------------------------------------------------------------------------------------------------
W, H = 640, 400                             # one panel
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50   # margins around the plot area: y ticks, title, x ticks and label
INSET = 12                                  # the axes' end ticks sit this far inside the frame
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]
GRID, INK = (225, 225, 225), (40, 40, 40)


def ticks(lo, hi, n=5):
    """About n round tick values (1, 2 or 5 x 10^k apart) from at or below lo to at or above hi."""
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9)
    return [(first + i) * step for i in range(math.ceil(hi / step - 1e-9) - first + 1)]


def label(v, tickstep=None):
    """Tick text: as many decimals as the tick spacing needs."""
    if tickstep is None:
        return f'{v:g}'
    return f'{v:.{max(0, -math.floor(math.log10(tickstep) + 1e-9))}f}'


def chart(series, title='', xlabel='', ylabel='', logx=False, xticks=None, band=None, size=(W, H)):
    """A line chart: series = [dict(label, x, y, err=None, color=None)], each a line through dots with
    error bars y +- err (colours from COLORS in turn); band = (label, y, halfwidth, color): a shaded horizontal
    band with a centre line (a baseline's mean +- std). xticks: the x ticks (needed with logx), else round
    values. Returns a white PIL image."""
    img = Image.new('RGB', size, 'white')
    dr = ImageDraw.Draw(img)
    font = ImageFont.load_default(13)
    tx = math.log10 if logx else float                      # data x -> axis coordinate
    xs = [x for s in series for x in s['x']]
    ys = [y + sgn * e for s in series for y, e in zip(s['y'], s.get('err') or [0] * len(s['y']))
          for sgn in (-1, 1)]
    ys += [band[1] - band[2], band[1] + band[2]] if band else []
    yt, xt = ticks(min(ys), max(ys)), xticks or ticks(min(xs), max(xs))
    (x0, x1), (y0, y1) = (tx(min(xt + xs)), tx(max(xt + xs))), (yt[0], yt[-1])
    x1 = x1 if x1 > x0 else x0 + 1
    a, b, c, e = LEFT, size[0] - RIGHT, TOP, size[1] - BOTTOM                # the plot area's frame
    px = lambda v: round(a + INSET + (tx(v) - x0) / (x1 - x0) * (b - a - 2 * INSET))
    py = lambda v: round(e - INSET - (v - y0) / (y1 - y0) * (e - c - 2 * INSET))
    for v in yt:                                             # grid lines and tick labels
        dr.line([(a, py(v)), (b, py(v))], GRID)
        dr.text((a - 6, py(v)), label(v, yt[1] - yt[0] if len(yt) > 1 else None), INK, font, anchor='rm')
    for v in xt:
        dr.line([(px(v), c), (px(v), e)], GRID)
        dr.text((px(v), e + 6), label(v, None if xticks else xt[1] - xt[0]), INK, font, anchor='mt')
    dr.rectangle([a, c, b, e], outline=INK)
    legend = []
    if band:
        name, y, half, color = band
        light = tuple(int(255 - (255 - ch) * 0.25) for ch in color)        # the colour at 25 %, on white
        dr.rectangle([a + 1, py(y + half), b - 1, py(y - half)], fill=light)
        dr.line([(a + 1, py(y)), (b - 1, py(y))], color, 2)
        legend.append((name, color))
    marks = []                                               # every dot and error-bar end, for the legend
    for i, s in enumerate(series):
        color = s.get('color') or COLORS[i % len(COLORS)]
        dodge = round((i - (len(series) - 1) / 2) * 4)       # series side by side: error bars do not overlap
        pts = [(px(x) + dodge, py(y)) for x, y in zip(s['x'], s['y'])]
        dr.line(pts, color, 2) if len(pts) > 1 else None
        for (x, y), (X, Y), err in zip(zip(s['x'], s['y']), pts, s.get('err') or [0] * len(pts)):
            if err:
                dr.line([(X, py(y - err)), (X, py(y + err))], color, 1)
                dr.line([(X - 4, py(y - err)), (X + 4, py(y - err))], color, 1)
                dr.line([(X - 4, py(y + err)), (X + 4, py(y + err))], color, 1)
            dr.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=color)
            marks += [(X, Y), (X, py(y - err)), (X, py(y + err))]
        legend.append((s['label'], color))
    draw_legend(dr, font, legend, (a, c, b, e), marks)
    dr.text(((a + b) // 2, c // 2), title, INK, ImageFont.load_default(15), anchor='mm')
    dr.text(((a + b) // 2, size[1] - 8), xlabel, INK, font, anchor='md')
    if ylabel:                                               # drawn sideways, then pasted at the left edge
        w = int(dr.textlength(ylabel, font)) + 4
        side = Image.new('RGB', (w, 18), 'white')
        ImageDraw.Draw(side).text((2, 2), ylabel, INK, font)
        side = side.rotate(90, expand=True)
        img.paste(side, (4, (c + e) // 2 - w // 2))
    return img


def draw_legend(dr, font, entries, frame, points):
    """The legend in the corner of the plot area that hides the fewest of the points given."""
    a, c, b, e = frame
    w = 34 + max(int(dr.textlength(name, font)) for name, _ in entries)
    h = 6 + 18 * len(entries)
    corners = [(b - w - 6, c + 6), (a + 6, c + 6), (b - w - 6, e - h - 6), (a + 6, e - h - 6)]
    hidden = lambda xy: sum(xy[0] <= X <= xy[0] + w and xy[1] <= Y <= xy[1] + h for X, Y in points)
    x, y = min(corners, key=hidden)
    dr.rectangle([x, y, x + w, y + h], fill='white', outline=GRID)
    for i, (name, color) in enumerate(entries):
        yy = y + 12 + 18 * i
        dr.line([(x + 6, yy), (x + 26, yy)], color, 3)
        dr.text((x + 32, yy), name, INK, font, anchor='lm')


def panels(images, cols):
    """Panels side by side, `cols` per row, on one white image."""
    rows = (len(images) + cols - 1) // cols
    out = Image.new('RGB', (W * cols, H * rows), 'white')
    for i, im in enumerate(images):
        out.paste(im, (W * (i % cols), H * (i // cols)))
    return out


def mean_sd(xs):
    """(mean, std) over the seeds; std 0 for a single seed."""
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def series_of(label, points, color=None):
    """A chart series from {x: (mean, std)}."""
    return dict(label=label, x=list(points), y=[m for m, _ in points.values()],
                err=[sd for _, sd in points.values()], color=color)


def by(rows, metric, group):
    """{value of `group`: (mean, std) of `metric`} over the rows, sorted by the group value."""
    values = {}
    for r in rows:
        values.setdefault(r[group], []).append(r[metric])
    return {k: mean_sd(v) for k, v in sorted(values.items())}


def curve_series(rows, metric):
    """One series per setting: the metric against the step."""
    return [series_of(setting, by([r for r in rows if r['setting'] == setting], metric, 'step'))
            for setting in dict.fromkeys(setting for setting, _ in by_setting(rows))]


def gamma_panel(ds, sweep):
    """(a) FID vs gamma: SAR's official recipe as a line, all transitions at its gamma, TF as a band."""
    last, every = (by([r for r in sweep if r['variant'] == v], 'fid', 'gamma') for v in ('sar', 'sar_all'))
    tf = mean_sd([r['fid'] for r in sweep if r['variant'] == 'tf'])
    series = [series_of(name, points, color) for name, points, color in (
        ('SAR, last transition', last, COLORS[1]), ('SAR, all transitions', every, COLORS[2])) if points]
    return chart(series, f'{ds}: FID after the sweep steps vs gamma', 'gamma (log scale)', 'domain FID',
                 logx=True, xticks=sorted(set(last) | set(every)), band=('TF (mean ± std)', *tf, COLORS[0]))


def per_scale_panel(ds, sweep):
    """(d) the CE of each scale against the GT tokens: TF and the best SAR setting of the sweep on their own
    rollouts, and TF on teacher-forced inputs (the gap between the two TF lines is the exposure bias)."""
    fid = lambda setting: statistics.mean(r['fid'] for r in sweep if r['setting'] == setting)
    best = min({r['setting'] for r in sweep if r['variant'] != 'tf'}, key=fid)
    scales = sorted(int(k.rsplit('_', 1)[1]) for k in sweep[0] if k.startswith('rollout_ce_'))
    series = []
    for setting, kind, color in (('tf', 'teacher', (150, 150, 150)), ('tf', 'rollout', COLORS[0]),
                                 (best, 'rollout', COLORS[1])):
        rs = [r for r in sweep if r['setting'] == setting]
        series.append(series_of(f'{setting}, {kind} inputs',
                                {pn: mean_sd([r[f'{kind}_ce_{pn}'] for r in rs]) for pn in scales}, color))
    return chart(series, f'{ds}: CE per scale vs the GT tokens', 'scale (side of the token map)',
                 'cross entropy', xticks=scales)


def plot_all(rows, out):
    """The study's figures, one panel per dataset (two for scratch.png), into <out>/plots/."""
    figures = {'fid_vs_gamma.png': [], 'budget_fid.png': [], 'scratch.png': [], 'per_scale_ce.png': []}
    for ds in dict.fromkeys(r['dataset'] for r in rows):
        sweep, budget, scratch = ([r for r in rows if r['dataset'] == ds and r['part'] == p] for p in PARTS)
        if {r['variant'] == 'tf' for r in sweep} == {True, False}:          # TF and at least one SAR setting
            figures['fid_vs_gamma.png'].append(gamma_panel(ds, sweep))
            figures['per_scale_ce.png'].append(per_scale_panel(ds, sweep))
        if budget:                                                         # (b) longer post-training
            figures['budget_fid.png'].append(chart(curve_series(budget, 'fid'),
                                                   f'{ds}: longer post-training from P', 'step', 'domain FID'))
        if scratch:                                                        # (c) Figure 1a at this scale
            figures['scratch.png'] += [
                chart(curve_series(scratch, 'fid'), f'{ds}: from scratch, FID', 'step', 'domain FID'),
                chart(curve_series(scratch, 'ce_rollout'), f'{ds}: from scratch, rollout CE', 'step',
                      'CE, own-rollout inputs')]
    os.makedirs(os.path.join(out, 'plots'), exist_ok=True)
    for name, ims in figures.items():
        if ims:
            panels(ims, 2 if name == 'scratch.png' else len(ims)).save(os.path.join(out, 'plots', name))


def choices(out, ds):
    """What study2.sh chose for dataset ds: (its best gamma, its budget settings); None before it chose."""
    got = []
    for name in ('best_gamma.txt', 'budget.txt'):
        p = os.path.join(out, ds, name)
        got.append(open(p).read().split() if os.path.isfile(p) else None)
    return (float(got[0][0]) if got[0] else None), got[1]


def summarise(out, batch):
    rows = read_points(out, batch)
    if not rows:
        fail(f"no evaluation points under {out} (<dataset>/<part>/<setting>/s<seed>/at_<step>/eval.json)")
    datasets = list(dict.fromkeys(r['dataset'] for r in rows))
    chosen = {ds: choices(out, ds) for ds in datasets}
    commit = write_results(out, rows, best_gamma={ds: c[0] for ds, c in chosen.items()},
                           budget={ds: c[1] for ds, c in chosen.items()})
    print(f"second study, commit {commit}")
    print_tables(rows)
    plot_all(rows, out)
    print(f"\nwrote {out}/results.json, {out}/results.csv and {out}/plots/*.png")


def main(argv):
    flag = argv[0] if argv else ''
    if flag == '--best-gamma' and len(argv) > 2:
        print(best_gamma(argv[1], argv[2:]))
    elif flag == '--best' and len(argv) > 3 and argv[1].isdigit():
        print(' '.join(best_settings(argv[2], int(argv[1]), argv[3:])))
    elif flag == '--same-weights' and len(argv) == 3:
        same_weights(argv[1], argv[2])
    elif len(argv) == 2 and not flag.startswith('-') and argv[1].isdigit():
        summarise(argv[0], int(argv[1]))
    else:
        fail("usage: study2_summary.py OUT BATCH | --best-gamma DIR GAMMA... | --best N DIR SETTING... | "
             "--same-weights CKPT_A CKPT_B")


if __name__ == '__main__':
    main(sys.argv[1:])
