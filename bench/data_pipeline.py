"""Data-pipeline throughput: our shards + TrainStream vs torchvision ImageFolder + lightly's DINOTransform.

Both pipelines decode the same JPEGs (synthetic 500x375, quality 90) and produce DINO multi-crop views
(2 x 224 px global + 6 x 96 px local). Rows, measured side by side in one run (rounds interleaved, median):

- ``ours``: WebDataset shards from ``make_shards`` -> ``build_train_stream`` (epoch mode) with the project's
  ``build_multicrop("dino", n_local=6)`` (default kernels: the exact numba ports of the PIL ops);
- ``ours-pil``: the same with ``kernels="pil"`` (torchvision's PIL functionals: identical views, the old speed);
- ``ours+lightly``: the same stream with lightly's ``DINOTransform`` (isolates the data path);
- ``baseline``: ``torchvision.datasets.ImageFolder`` + ``DINOTransform`` in a plain ``DataLoader``.

Each pipeline runs ``--workers`` DataLoader workers (one run per count given, 1 and 2 by default) with one torch
thread each; samples/s per worker is printed with the CPU time per sample (all processes; the main process's
share apart), then per worker count the ratios ``ours / baseline`` (target >= 1.5), ``ours-pil / baseline`` and
``ours+lightly / baseline``, and the same comparison in CPU time per sample (steadier on a loaded machine).

    python bench/data_pipeline.py [--images 192] [--workers 1 2] [--rounds 3] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader


def make_images(root: Path, count: int, classes: int = 8) -> None:
    """Smooth random 500x375 JPEGs (natural-image-like compression ratio), ``classes`` folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        low = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(-12, 13, (375, 500, 3))
        image = Image.fromarray(np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8))
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img{i:05d}.jpg", quality=90)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def time_loader(batches, expected: int) -> tuple[float, float, float]:
    """(samples per second, CPU ms per sample of all processes, CPU ms per sample of the main process) over one
    pass (worker start-up included, as a training epoch would see it). The CPU times hold up on a loaded machine,
    where wall-clock rates swing with the other jobs: the workers' come from ``RUSAGE_CHILDREN`` once the pass has
    joined them."""
    gc.collect()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    main_start = time.process_time()
    start = time.perf_counter()
    seen, batch = 0, None
    for batch in batches:
        seen += len(batch[1]) if isinstance(batch, (list, tuple)) else len(batch["keys"])
    del batch  # the last batch's shared memory, before the workers are counted
    elapsed = time.perf_counter() - start
    main_cpu = time.process_time() - main_start
    gc.collect()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    assert seen >= expected, (seen, expected)
    return seen / elapsed, 1000 * (main_cpu + workers_cpu) / seen, 1000 * main_cpu / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lightly.transforms.dino_transform import DINOTransform
    from torchvision.datasets import ImageFolder

    from ssl_vil.augment import build_multicrop
    from ssl_vil.data import build_train_stream
    from ssl_vil.data.make_shards import make_shards

    dino = DINOTransform(global_crop_size=224, local_crop_size=96, n_local_views=6)
    ours_tf = build_multicrop("dino", global_size=224, local_size=96, n_local=6)
    ours_pil = build_multicrop("dino", global_size=224, local_size=96, n_local=6, kernels="pil")

    def lightly_with_generator(image, generator):
        return dino(image)

    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        make_images(folder, args.images)
        make_shards(str(folder), shards, maxcount=max(1, args.images // 8), progress=False)
        n = args.images - args.images % args.batch_size
        print(f"images={args.images} batch={args.batch_size} rounds={args.rounds} torch={torch.__version__} "
              f"views=2x224+6x96 kernels={ours_tf.kernels}")
        summary = []
        for workers in args.workers:

            def stream(transform, workers=workers):
                return build_train_stream(shards, batch_size=args.batch_size, seed=0, rank=0, world_size=1,
                                          num_workers=workers, transform=transform, error_budget_fraction=None,
                                          drop_last=True)

            def baseline(workers=workers):
                dataset = ImageFolder(str(folder), transform=dino)
                return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                  drop_last=True, worker_init_fn=_one_thread)

            rows = {"ours": lambda: stream(ours_tf), "ours-pil": lambda: stream(ours_pil),
                    "ours+lightly": lambda: stream(lightly_with_generator), "baseline": baseline}
            rates: dict[str, list[float]] = {name: [] for name in rows}
            cpu: dict[str, list[float]] = {name: [] for name in rows}
            main_cpu: dict[str, list[float]] = {name: [] for name in rows}
            for _ in range(args.rounds):
                for name, build in rows.items():
                    rate, cpu_ms, main_ms = time_loader(build(), n)
                    rates[name].append(rate)
                    cpu[name].append(cpu_ms)
                    main_cpu[name].append(main_ms)
            per_worker = {name: statistics.median(r) / max(1, workers) for name, r in rates.items()}
            cpu_ms = {name: statistics.median(c) for name, c in cpu.items()}
            print(f"workers={workers}")
            for name, rate in per_worker.items():
                spread = ", ".join(f"{r / max(1, workers):.1f}" for r in rates[name])
                print(f"{name:>13}: {rate:7.1f} samples/s per worker (rounds: {spread}); CPU {cpu_ms[name]:5.2f} "
                      f"ms/sample, main process {statistics.median(main_cpu[name]):4.2f}")
            ratios = {name: per_worker[name] / per_worker["baseline"] for name in ("ours", "ours-pil", "ours+lightly")}
            cpu_ratios = {name: cpu_ms["baseline"] / cpu_ms[name] for name in ("ours", "ours-pil", "ours+lightly")}
            summary.append((workers, ratios, cpu_ratios))
        for workers, ratios, cpu_ratios in summary:
            print(f"workers={workers}: ratio ours / baseline = {ratios['ours']:.2f} (target >= 1.5); "
                  f"ours-pil / baseline = {ratios['ours-pil']:.2f}; ours+lightly / baseline = "
                  f"{ratios['ours+lightly']:.2f} (data path alone); CPU per sample baseline / ours = "
                  f"{cpu_ratios['ours']:.2f} (ours-pil {cpu_ratios['ours-pil']:.2f}, ours+lightly "
                  f"{cpu_ratios['ours+lightly']:.2f})")


if __name__ == "__main__":
    main()
