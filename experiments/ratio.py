"""
Ours / official from the JSON lines of bench.py and official_timing.py run with the same flags.

    python experiments/bench.py $C > ours.txt
    python experiments/official_timing.py --official /path/to/SAR $C > official.txt
    python experiments/ratio.py ours.txt official.txt          # or: cat ours.txt official.txt | ... ratio.py

Reads every line that is a JSON object (the step lines are skipped) from the files, or from stdin; needs
exactly two, one with side "ours" and one with side "official". Prints each measured number of both and the
ratio ours / official (a time below 1, images_per_s above 1: ours is faster). Refuses two runs whose
configurations differ.
"""
import json
import sys

CONFIG = ('depth', 'batch', 'mode', 'sf_input', 'scales', 'image_size', 'device', 'dtype', 'cfg', 'top_k', 'top_p')


def runs(files):
    """The JSON objects among the lines of files (stdin if none)."""
    found = []
    for f in files or ['-']:
        with (sys.stdin if f == '-' else open(f)) as fh:
            for line in fh:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                found.append(obj) if isinstance(obj, dict) else None
    return found


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {'-h', '--help'} & set(argv):
        return print(__doc__.strip())
    try:
        found = runs(argv)
        by_side = {r.get('side'): r for r in found}
        if len(found) != 2 or set(by_side) != {'ours', 'official'}:
            raise ValueError(f"need one JSON line of bench.py (side ours) and one of official_timing.py "
                             f"(side official), found sides {[r.get('side') for r in found]}")
        ours, off = by_side['ours'], by_side['official']
        differ = [k for k in CONFIG if ours.get(k) != off.get(k)]
        if differ:
            raise ValueError("the runs differ in " + ', '.join(f"{k} ({ours.get(k)} vs {off.get(k)})" for k in differ))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    ratios = {}
    for k, v in ours.items():
        w = off.get(k)
        if k not in CONFIG and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (v, w)) and w:
            ratios[k] = round(v / w, 3)
            print(f"{k:18s} ours {v:<10} official {w:<10} ours/official {ratios[k]}")
    return ratios


if __name__ == '__main__':
    main()
