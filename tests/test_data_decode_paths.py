"""One decoder everywhere: a 16-bit grayscale, an RGBA and two palette PNGs give bitwise-identical tensors through
the pretraining shard stream, the evaluation shard stream, the evaluation ImageFolder input and the fine-tuning
ImageFolder stream; an undecodable file in an ImageFolder is skipped and counted, as a bad shard record is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vil.data import make_shards
from ssl_vil.data.errors import DataErrorBudgetExceeded
from ssl_vil.data.train_stream import build_train_stream
from ssl_vil.eval.inputs import open_eval_source
from ssl_vil.eval.train_inputs import ImageFolderTrainStream, SeededTransform, open_train_stream

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

SIZE = 8


def _pixels_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 exactly as decoded: no resize, no normalisation, so any decoder difference shows."""
    assert image.mode == "RGB"
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def _seeded_pixels(image: Image.Image, generator: torch.Generator) -> torch.Tensor:
    return _pixels_to_tensor(image)


def _write_images(root: Path) -> dict[str, torch.Tensor | None]:
    """Four awkward PNGs in ImageFolder layout; returns {class/file: the RGB tensor the project decoder must give}."""
    rng = np.random.default_rng(0)
    expected = {}
    # 16-bit grayscale, values spanning the full 16-bit range: rescaled (>> 8), not clipped to white.
    gray16 = rng.integers(0, 65536, size=(SIZE, SIZE), dtype=np.uint16)
    gray16[0, :4] = [0, 255, 256 * 100, 65535]
    (root / "gray16").mkdir(parents=True)
    Image.fromarray(gray16).save(root / "gray16" / "g.png")
    assert Image.open(root / "gray16" / "g.png").mode == "I;16"
    expected["gray16/g.png"] = torch.from_numpy((gray16 >> 8).astype(np.uint8)).expand(3, -1, -1)
    # RGBA with every alpha level: composited on black.
    rgba = rng.integers(0, 256, size=(SIZE, SIZE, 4), dtype=np.uint8)
    rgba[0, 0] = [200, 100, 50, 0]  # fully transparent: black, whatever its hidden colour
    rgba[0, 1] = [200, 100, 50, 255]
    (root / "rgba").mkdir()
    Image.fromarray(rgba).save(root / "rgba" / "a.png")
    expected["rgba/a.png"] = None  # values checked at the two pinned pixels (partial alpha rounds the PIL way)
    # Palette without and with a transparent entry.
    palette = rng.integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8) % 4
    colours = [10, 20, 30, 200, 100, 0, 0, 255, 0, 255, 255, 255] + [0] * (256 * 3 - 12)
    (root / "palette").mkdir()
    plain = Image.fromarray(palette, mode="P")
    plain.putpalette(colours)
    plain.save(root / "palette" / "p.png")
    transparent = Image.fromarray(palette, mode="P")
    transparent.putpalette(colours)
    transparent.save(root / "palette" / "t.png", transparency=1)
    assert Image.open(root / "palette" / "t.png").info.get("transparency") == 1
    table = torch.tensor(colours[:12], dtype=torch.uint8).view(4, 3)
    expected["palette/p.png"] = table[torch.from_numpy(palette).long()].permute(2, 0, 1)
    with_black = table.clone()
    with_black[1] = 0  # the transparent entry composites to black
    expected["palette/t.png"] = with_black[torch.from_numpy(palette).long()].permute(2, 0, 1)
    return expected


def _by_key(batches, image_field: str, key_of) -> dict[str, torch.Tensor]:
    out = {}
    for batch in batches:
        for key, image in zip(batch["keys"], batch[image_field]):
            out[key_of(key)] = image
    return out


def _shard_key(key: str) -> str:
    # make_shards keys are the relative path without suffix, '/' sanitised to '_': "gray16_g" -> "gray16/g.png"
    folder, name = key.split("_", 1)
    return f"{folder}/{name}.png"


@pytest.fixture()
def folder_and_shards(tmp_path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "folder"
    expected = _write_images(folder)
    shards = tmp_path / "shards"
    assert make_shards.main([str(folder), str(shards), "--split", "train", "--maxcount", "2", "--no-shuffle"]) == 0
    return folder, shards, expected


def test_every_path_decodes_bitwise_identically(folder_and_shards):
    folder, shards, expected = folder_and_shards
    train_stream = build_train_stream(shards, mode="epoch", batch_size=4, seed=0, rank=0, world_size=1,
                                      num_workers=0, transform=_seeded_pixels, error_budget_fraction=0.0)
    pretrain = _by_key(list(train_stream), "views", _shard_key)
    eval_shards = _by_key(open_eval_source(str(shards), transform=_pixels_to_tensor, batch_size=3).batches(),
                          "images", _shard_key)
    eval_folder = _by_key(open_eval_source(str(folder), transform=_pixels_to_tensor, batch_size=3).batches(),
                          "images", str)
    finetune = _by_key(list(open_train_stream(str(folder), transform=_pixels_to_tensor, batch_size=4, seed=0,
                                              rank=0, world_size=1, num_workers=0)), "views", str)
    assert sorted(pretrain) == sorted(eval_shards) == sorted(eval_folder) == sorted(finetune) == sorted(expected)
    for key in expected:
        for name, got in (("eval shards", eval_shards), ("eval ImageFolder", eval_folder),
                          ("fine-tune ImageFolder", finetune)):
            assert got[key].dtype == torch.uint8 and torch.equal(got[key], pretrain[key]), (key, name)
    # The values themselves: 16-bit data rescaled (not all white), palettes looked up, transparency on black.
    assert pretrain["gray16/g.png"][:, 0, :4].tolist() == [[0, 0, 100, 255]] * 3
    assert torch.equal(pretrain["gray16/g.png"], expected["gray16/g.png"])
    assert torch.equal(pretrain["palette/p.png"], expected["palette/p.png"])
    assert torch.equal(pretrain["palette/t.png"], expected["palette/t.png"])
    rgba = pretrain["rgba/a.png"]
    assert rgba[:, 0, 0].tolist() == [0, 0, 0] and rgba[:, 0, 1].tolist() == [200, 100, 50]


def test_undecodable_imagefolder_file_is_skipped_and_counted(folder_and_shards, caplog):
    folder, _, expected = folder_and_shards
    (folder / "rgba" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    source = open_eval_source(str(folder), transform=_pixels_to_tensor, batch_size=3)
    batches = list(source.batches())
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(expected)  # the broken file is dropped, every other one delivered once
    assert source.num_samples == 5
    assert source.error_totals()["undecodable_image"] == 1
    assert sum(b["data_errors"]["undecodable_image"] for b in batches) == 1
    assert any("rgba/broken.png" in r.getMessage() and "undecodable_image" in r.getMessage() for r in caplog.records)

    # Fine-tuning stream: the bad file's slot is filled with another sample of its batch, flagged and counted,
    # under the shard stream's error budget (1 % by default: one bad file of five stops it, naming the file).
    stream = open_train_stream(str(folder), transform=_pixels_to_tensor, batch_size=5, seed=0, rank=0,
                               world_size=1, num_workers=0)
    with pytest.raises(DataErrorBudgetExceeded, match="rgba/broken.png"):
        list(stream)
    stream = ImageFolderTrainStream(str(folder), transform=SeededTransform(_pixels_to_tensor), batch_size=5, seed=0,
                                    rank=0, world_size=1, num_workers=0, error_budget_fraction=0.5)
    (batch,) = list(stream)
    assert batch["padded"].tolist().count(True) == 1
    assert batch["data_errors"]["undecodable_image"] == 1 and batch["data_errors"]["lost_samples"] == 1
    assert "rgba/broken.png" not in batch["keys"] and set(batch["keys"]) == set(expected)
