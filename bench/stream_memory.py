"""Peak memory of the streaming folder loader against the size of the decoded set.

    python bench/stream_memory.py --images 3000 --size 224                  # one epoch through the loader
    python bench/stream_memory.py --images 20000 --size 32 --train -- --arch vgg11 --width 0.25

Generates the folder (``bench/image_folder.py``) unless ``--dir`` already holds one, then runs, in
a fresh process, either one epoch of the training loader (decode, random-resized crop, flip,
normalise, batches of ``--batch-size`` from ``--workers`` workers) or, with ``--train``, one epoch
of ``slim2deploy train --stream`` (arguments after ``--`` go to it). It samples the memory of that
process and its DataLoader workers every 50 ms and prints the peak next to what the decoded set
would take as one float32 tensor (the in-memory loader's layout). Memory is the proportional set
size (PSS: shared pages split between the processes sharing them), summed over the process tree;
the floor is the same for a process that only imports torch and slim2deploy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from image_folder import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
LOADER = """
import sys, time
from slim2deploy.model.folder import load_data
ds = load_data(sys.argv[1], "train", image_size=int(sys.argv[2]), crop=int(sys.argv[2]), stream=True,
               workers=int(sys.argv[3]))
t = time.perf_counter(); n = 0
for x, y in ds.batches(int(sys.argv[4]), shuffle=True, augment=True):
    n += len(y)
print(f"{n} images in {time.perf_counter() - t:.1f} s", flush=True)
"""
FLOOR = "import torch, torchvision, slim2deploy.model.folder, slim2deploy.model.loop, time; time.sleep(1)"


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss(pid: int) -> int:
    """PSS in bytes of ``pid`` and all its descendants."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        total += _pss_kib(p)
        todo += kids.get(p, [])
    return total * 1024


def run_measured(cmd: list[str]) -> tuple[int, float, str]:
    """(peak tree PSS in bytes, seconds, output) of ``cmd``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} ... failed:\n{out[-3000:]}")
    return peak, time.perf_counter() - started, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=224, help="image side, and the crop the loader produces")
    p.add_argument("--dir", type=Path, default=None, help="use (or fill) this folder instead of a temporary one")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train", action="store_true", help="one epoch of 'slim2deploy train --stream' instead")
    p.add_argument("rest", nargs="*", help="after --: more arguments for 'slim2deploy train'")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp) / "images"
        if not folder.is_dir() or not any(folder.iterdir()):
            t = time.perf_counter()
            make_image_folder(folder, args.images, args.size, fmt="jpg")
            print(f"generated {args.images} images of about {args.size}x{args.size} in {time.perf_counter() - t:.0f} s")
        n = sum(1 for _ in folder.rglob("*.jpg"))
        if args.train:
            what = "one epoch of slim2deploy train --stream"
            cmd = [sys.executable, "-m", "slim2deploy", "train", "--data", str(folder), "--stream",
                   "--image-size", str(args.size), "--crop", str(args.size), "--workers", str(args.workers),
                   "--batch-size", str(args.batch_size), "--epochs", "1", "--out", str(Path(tmp) / "out.pt"),
                   *args.rest]  # fmt: skip
        else:
            what = "one epoch through the streaming loader"
            cmd = [sys.executable, "-c", LOADER, str(folder), str(args.size), str(args.workers), str(args.batch_size)]
        floor, _, _ = run_measured([sys.executable, "-c", FLOOR])
        peak, seconds, out = run_measured(cmd)
    decoded = n * 3 * args.size * args.size * 4
    tail = [line for line in out.replace("\r", "\n").splitlines() if line.strip()][-3:]
    print("\n".join(tail))
    print(f"{what}: {n} images of {args.size}x{args.size}, {args.workers} workers, batch {args.batch_size}")
    print(f"  decoded float32 set (what the in-memory loader holds): {decoded / 2**20:10.1f} MiB")
    print(f"  peak memory of the run (PSS, process + workers):        {peak / 2**20:10.1f} MiB")
    print(f"  of which the floor (a process importing torch):         {floor / 2**20:10.1f} MiB")
    print(f"  peak / decoded size: {peak / decoded:.3f}; wall time {seconds:.1f} s ({n / seconds:.0f} images/s)")


if __name__ == "__main__":
    main()
