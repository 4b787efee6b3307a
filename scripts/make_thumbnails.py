"""Regenerate the README's lesson thumbnails: run every lesson in full mode, then shrink the figure
each lesson marks as its main one (metrics.json "main_figure") into docs/thumbs/<lesson>.png.

    python scripts/make_thumbnails.py              # every lesson (about 10 minutes on 2 cores)
    python scripts/make_thumbnails.py 04 05        # only lessons whose name starts with these
    python scripts/make_thumbnails.py --no-run     # reuse runs/<lesson>/ from earlier full runs

Prints one README table row per lesson with its measured full-mode time.
"""
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 360


def main(argv):
    run = "--no-run" not in argv
    only = [a for a in argv if not a.startswith("--")]
    from PIL import Image   # pillow comes with matplotlib
    os.makedirs(os.path.join(ROOT, "docs", "thumbs"), exist_ok=True)
    for script in sorted(glob.glob(os.path.join(ROOT, "lessons", "[0-9][0-9]_*.py"))):
        name = os.path.basename(script)[:-3]
        if only and not any(name.startswith(o) for o in only):
            continue
        out = os.path.join(ROOT, "runs", name)
        if run:
            r = subprocess.run([sys.executable, script, "--out", out], cwd=ROOT,
                               env=dict(os.environ, MPLBACKEND="Agg"))
            if r.returncode:
                print(f"{name}: exited {r.returncode}; thumbnail not updated", file=sys.stderr)
                continue
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        img = Image.open(os.path.join(out, metrics["main_figure"]))
        img.thumbnail((WIDTH, WIDTH * 10))
        dest = os.path.join(ROOT, "docs", "thumbs", f"{name}.png")
        img.save(dest, optimize=True)
        print(f"| {name} | {metrics['seconds']:.0f} s | ![{name}](docs/thumbs/{name}.png) |")


if __name__ == "__main__":
    main(sys.argv[1:])
