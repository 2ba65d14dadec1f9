"""k-NN evaluation of a pretrained backbone (DINO / DINOv2 protocol); the code behind ``eval/knn.py``.

    python eval/knn.py --weights RUN --train-data D --val-data D [--k 10 20 100 200] [--temperature 0.07]
        [--features cls|avg|cls+avg] [--backend torch|faiss] [--batch-size 256] [--output-dir OUT]
    torchrun --nproc_per_node=N eval/knn.py ...        (train features stay sharded across ranks)

``--weights``: a run dir (newest valid checkpoint's teacher), a checkpoint step folder, an exported
``teacher_backbone.safetensors`` (``model.json`` beside it), or any other ViL weights file with ``--model``;
``random:SPEC`` is SPEC's architecture at random init (seed ``--init-seed``), the baseline:
``random:recipes/demo_digits.yaml``, ``random:RUN``, ``random:vil2_small_patch16_224``
(see :mod:`ssl_vil.eval.weights_id`); ``pixels:SPEC`` is the input baseline, the pixels of SPEC's eval transform
flattened as the features (``pixels:RUN`` for a run's).
``D``: a shard directory / glob / URL, or an ImageFolder directory; every sample is used exactly once. Labels are
indices of the train data's class list: val labels are matched to it by class name, and a val class the train data
lacks is refused (exit status 2, one line). ``results_knn.json`` records that list, k, T and crop_pct.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_vil.config import engine
from ssl_vil.config.errors import invalid
from ssl_vil.eval.options import (BACKENDS, DEFAULT_CROP_PCT, FEATURE_SPECS, EvalInputsConfig, add_input_arguments,
                                  refuse_pipe_urls)
from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors

if TYPE_CHECKING:  # the work's modules (torch, torchvision, timm) load when an evaluation runs, not for --help
    import torch

    from ssl_vil.eval import features as feats
    from ssl_vil.infra.dist import DistInfo

logger = logging.getLogger("ssl_vil.eval")

RESULTS_FILE = "results_knn.json"
PROG = "eval/knn.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="k-NN evaluation of a pretrained ViL backbone",
                                formatter_class=HelpFormatter)
    add_version(p)
    add_input_arguments(p, weights_help="run dir | checkpoint folder | exported .safetensors | weights file | "
                        "random:RECIPE.yaml|RUN|MODEL_NAME (random-init baseline) | "
                        "pixels:RECIPE.yaml|RUN|MODEL_NAME (raw-pixel baseline at that model's input)",
                        batch_size=256, batch_help="feature-extraction batch per process", results_file=RESULTS_FILE)
    p.add_argument("--init-seed", type=int, default=0, help="torch seed of a --weights random:... init")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbour counts")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T)")
    p.add_argument("--features", choices=FEATURE_SPECS, default=None,
                   help='"[CLS]" = the pooled token (a ViL\'s bilateral concat or middle token, a ViT\'s class token), '
                        '"[AVG]" = mean patch token, or their concat; default: the feature the DINO head was trained '
                        'on (avg for a run with objective.pooling=avg, else cls), as the in-training k-NN monitor')
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--faiss-fp16", action="store_true", help="faiss GPU index in float16")
    return p


@dataclass(kw_only=True, slots=True)
class KnnEvalConfig(EvalInputsConfig):
    """The evaluation's settings, typed and checked by the config engine: one field per flag of
    :func:`build_parser` (``--train-data X`` is ``train_data``), whose defaults the flags hold; the
    inputs' fields come from :class:`EvalInputsConfig`."""

    k: list[int]
    temperature: float
    features: str | None
    backend: str
    faiss_fp16: bool
    init_seed: int

    def validate(self) -> None:
        EvalInputsConfig.validate(self)  # explicit: slots=True rebuilds the class, which zero-arg super() misses
        if not self.k or any(k < 1 for k in self.k):
            raise invalid("k", self.k, "neighbour counts >= 1")
        if self.temperature <= 0:
            raise invalid("temperature", self.temperature, "a positive temperature")
        refuse_pipe_urls(self)


def parse_config(argv: list[str] | None = None) -> KnnEvalConfig:
    """The command line as a checked :class:`KnnEvalConfig`."""
    return engine.parse_flags(KnnEvalConfig, build_parser(), argv)


@user_errors(PROG)
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the results dict (also written to ``OUT/results_knn.json`` by rank 0).

    A user error (unreadable weights, missing shards, val classes the train data lacks...) exits with status 2
    and one line on stderr (:mod:`ssl_vil.infra.cli_errors`).
    """
    args = parse_config(argv)
    from ssl_vil.infra.dist import process_group

    with process_group(args.device) as dist:
        return evaluate(args, dist)


def evaluate(args: KnnEvalConfig, dist: DistInfo) -> dict[str, Any]:
    """The k-NN evaluation for parsed ``args`` on this process (collective when distributed)."""
    from ssl_vil.backbones.pooling import token_layout
    from ssl_vil.eval import features as feats
    from ssl_vil.eval.inputs import default_split, eval_transform, open_eval_source
    from ssl_vil.eval.knn_search import knn_classify
    from ssl_vil.eval.progress import Progress
    from ssl_vil.eval.reporting import setup_logging
    from ssl_vil.eval.weights_id import (is_pixels, is_random_init, pixel_baseline, random_init_backbone,
                                         weights_sha256)
    from ssl_vil.export import load_pretrained_backbone
    from ssl_vil.infra.dist import barrier
    from ssl_vil.infra.files import write_json_atomic

    t_start = time.perf_counter()
    setup_logging(dist.rank)

    if is_random_init(args.weights):
        model, info = random_init_backbone(args.weights, args.init_seed)
    elif is_pixels(args.weights):
        model, info = pixel_baseline(args.weights)
    else:
        model, info = load_pretrained_backbone(args.weights, args.model)
    model = model.to(dist.device).eval()
    img_size = args.img_size or int(info["img_size"])
    crop_pct = args.crop_pct if args.crop_pct is not None else float(info.get("crop_pct", DEFAULT_CROP_PCT))
    transform = eval_transform(img_size, info["mean"], info["std"], crop_pct)
    pixels = is_pixels(args.weights)
    cls_pooling = "pixels" if pixels else feats.cls_pooling_of(model, info)
    spec = "pixels" if pixels else args.features or feats.trained_feature(info)
    layout = None if pixels else token_layout(model)
    t_loaded = time.perf_counter()

    def feature_fn(images: torch.Tensor) -> torch.Tensor:
        if pixels:  # (B, C*H*W): no tokens to pool
            return model.forward_features(images)
        return feats.pooled_features(model.forward_features(images), spec, cls_pooling, layout)

    sets: dict[str, feats.FeatureSet] = {}
    sizes: dict[str, int] = {}
    skipped: dict[str, int] = {}
    times: dict[str, float] = {"load_s": t_loaded - t_start}
    # Both sources are opened before any feature is computed, so a class mismatch is reported at once.
    train_source = open_eval_source(
        args.train_data, transform=transform, batch_size=args.batch_size, rank=dist.rank,
        world_size=dist.world_size, num_workers=args.num_workers,
        split=args.train_split or default_split(args.train_data, "train"))
    classes = list(train_source.classes)
    val_source = open_eval_source(
        args.val_data, transform=transform, batch_size=args.batch_size, rank=dist.rank, world_size=dist.world_size,
        num_workers=args.num_workers, split=args.val_split or default_split(args.val_data, "val"),
        classes=classes, classes_source=f"train data ({train_source.description})")
    for split, source in (("train", train_source), ("val", val_source)):
        logger.info("%s: %s (%s samples)", split, source.description, source.num_samples or "unknown")
        expected_local = -(-source.num_samples // dist.world_size) if source.num_samples else None
        t0 = time.perf_counter()
        progress = Progress(f"{split} features", expected_local, enabled=dist.is_main)
        sets[split] = feats.extract(source.batches(), feature_fn, device=dist.device, progress=progress,
                                    normalize=True)
        sizes[split] = feats.check_disjoint_across_ranks(sets[split].keys, split)
        skipped[split] = _check_count(split, source, sizes[split], dist.device)
        times[f"{split}_features_s"] = time.perf_counter() - t0
    if sizes["train"] == 0 or sizes["val"] == 0:
        raise RuntimeError(f"empty split: {sizes['train']} train and {sizes['val']} val samples")
    dim = _feature_dim(sets, dist.device)

    t0 = time.perf_counter()
    train, val = sets["train"], sets["val"]
    counts = knn_classify(
        _as_features(val.features, dim).to(dist.device), val.labels.to(dist.device),
        _as_features(train.features, dim).to(dist.device), train.labels.to(dist.device),
        args.k, temperature=args.temperature, backend=args.backend, faiss_fp16=args.faiss_fp16,
        num_classes=len(classes) or None,
    )
    times["knn_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_start

    results: dict[str, Any] = {
        "protocol": "knn",
        "weights": str(args.weights),
        "weights_sha256": (info["weights_sha256"] if "weights_sha256" in info
                           else weights_sha256(info.get("source", args.weights))),
        "weights_source": str(info.get("source", args.weights)),
        "model": info["model"],
        "model_kwargs": info.get("kwargs", {}),
        "features": {
            "spec": spec, "cls_pooling": cls_pooling, "dim": dim, "l2_normalized": True,
            "img_size": img_size, "crop_pct": crop_pct, "interpolation": "bicubic",
            "mean": list(info["mean"]), "std": list(info["std"]),
        },
        "train_data": args.train_data, "val_data": args.val_data,
        "n_train": sizes["train"], "n_val": sizes["val"],
        "skipped_unreadable": skipped,
        # The class index every label above is in (the train data's; val labels were matched to it by name).
        "classes": classes, "val_classes": list(val_source.own_classes),
        "k": list(args.k), "crop_pct": crop_pct,
        "temperature": args.temperature, "backend": args.backend, "world_size": dist.world_size,
        "device": str(dist.device),
        "results": [
            {"k": c.k, "k_effective": c.k_effective, "top1": c.top1, "top5": c.top5} for c in counts
        ],
        "elapsed": times,
    }
    summary = "kNN ({} {}, T={:g}, n_train={}, n_val={}): ".format(
        "input" if pixels else spec, "mean" if spec == "avg" else cls_pooling, args.temperature, sizes["train"],
        sizes["val"]) + "; ".join(
        f"k={c.k}{'' if c.k == c.k_effective else f'(={c.k_effective})'} top1 {c.top1:.2f} top5 {c.top5:.2f}"
        for c in counts)
    results["summary"] = summary
    if dist.is_main:
        if args.output_dir is not None:
            path = write_json_atomic(Path(args.output_dir) / RESULTS_FILE, results)
            logger.info("wrote %s", path)
        print(summary, flush=True)
    barrier()
    return results


def _check_count(split: str, source: Any, read: int, device: torch.device) -> int:
    """Samples the data layer skipped as unreadable (logged); raises if the count is off for any other reason."""
    from ssl_vil.infra.dist import all_reduce_scalar

    if source.num_samples is None:
        return 0
    issues = all_reduce_scalar(sum(source.error_totals().values()), "sum", device)
    missing = source.num_samples - read
    if missing == 0:
        return 0
    if 0 < missing <= issues:
        logger.warning("%s: %d of %d samples were unreadable and skipped (see the data warnings above)", split,
                       missing, source.num_samples)
        return missing
    raise RuntimeError(f"{split}: read {read} samples but {source.description} holds {source.num_samples}; "
                       "every sample must be used exactly once")


def _feature_dim(sets: dict[str, feats.FeatureSet], device: torch.device) -> int:
    """Feature size, agreed across ranks (a rank with no samples has no tensor to read it from)."""
    from ssl_vil.infra.dist import all_reduce_scalar

    local = max((s.features.shape[1] for s in sets.values() if s.features.numel()), default=0)
    return int(all_reduce_scalar(local, "max", device))


def _as_features(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if x.numel() else x.new_empty(0, dim)


if __name__ == "__main__":
    main()
