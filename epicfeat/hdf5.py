"""``epicfeat cache export``: one feature set's complete videos as a single HDF5 file, for tools outside epicfeat.

It reads through the store's public API (``complete_videos``, ``read``), so the Zarr layout stays the store's own.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from epicfeat import __version__
from epicfeat.store import FeatureStore, StoreError


def export_hdf5(store: FeatureStore, out_path: str | os.PathLike) -> Path:
    """Copy every complete video into one HDF5 file, chunk by chunk (constant memory); returns its path.

    Layout: ``/videos/<video_id>/{features, pts, frame_index}`` with the same dtypes and chunking along time.
    Attributes: every scalar attribute (str, int, float, bool) as itself, any other (dicts, lists, None) as a JSON
    string, and ``attrs_json`` holding all of them as one JSON object for an exact round trip. The root carries
    the identity the same way (``featureset_json`` for all of it), plus ``key`` and ``epicfeat_version``.
    The file is written under a temporary name and renamed, so ``out_path`` is never half written.
    """
    import h5py

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    dim = store.identity.feature_dim
    try:
        with h5py.File(tmp, "w") as h5:
            _h5_write_attrs(h5, store.identity.to_dict(), all_name="featureset_json")
            h5.attrs["key"] = store.path.name
            h5.attrs["epicfeat_version"] = __version__
            videos = h5.create_group("videos")
            for video_id in store.complete_videos():
                video = store.read(video_id)
                group = videos.create_group(video_id)
                _h5_write_attrs(group, video.attrs, all_name="attrs_json")
                rows, chunk_rows = video.rows, video.features.chunks[0]
                features = group.create_dataset("features", shape=(rows, dim), maxshape=(None, dim),
                                                dtype=video.features.dtype, chunks=(chunk_rows, dim))
                step = chunk_rows * 8
                for start in range(0, rows, step):
                    try:
                        block = video.features[start : start + step]  # (<=step, dim)
                    except Exception as err:  # a truncated / garbled chunk: name it instead of a traceback
                        raise StoreError(
                            f"cannot export {video_id} of {store.path}: rows {start}-{start + step - 1} cannot be "
                            f"read ({type(err).__name__}: {err}); run `epicfeat cache verify` and re-extract it"
                        ) from None
                    features[start : start + step] = block
                group.create_dataset("pts", data=video.pts)
                group.create_dataset("frame_index", data=video.frame_indices)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _h5_write_attrs(obj, attrs: dict, *, all_name: str) -> None:
    obj.attrs[all_name] = json.dumps(attrs)
    for key, value in attrs.items():
        native = isinstance(value, (str, int, float, bool)) and not (isinstance(value, float) and math.isnan(value))
        obj.attrs[key] = value if native else json.dumps(value)
