"""``.npz`` archives: one array per name, as written by ``np.savez``."""

from __future__ import annotations

import pathlib
import zipfile
from collections.abc import Mapping

import numpy as np

from secagg.errors import ModelFormatError
from secagg.models import check_numeric, conform


def read(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Return the archive's arrays in stored order. Pickled (object) arrays are refused."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy/zipfile raise many types for a bad file; report them as one
        # Neither zip nor .npy: numpy would fall back to pickle, which allow_pickle=False refuses.
        raise _corrupt(path, "not a zip archive" if "pickle" in str(e) else e) from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ModelFormatError(
            f"{path}: holds a single .npy array, not an .npz archive; save the named tensors "
            "with np.savez(path, **tensors)"
        )
    tensors = {}
    with archive:
        for name in archive.files:
            try:
                arr = archive[name]
            except ValueError as e:
                # allow_pickle=False refuses object arrays: they would run code when loaded.
                if "pickle" in str(e):
                    raise ModelFormatError(
                        f"{path}: tensor {name!r} is a pickled object array; store numeric "
                        "arrays only"
                    ) from e
                raise _corrupt(path, e) from e
            except Exception as e:
                raise _corrupt(path, e) from e
            check_numeric(path, name, arr.dtype)
            tensors[name] = arr
    return tensors


def write(template: pathlib.Path, tensors: Mapping[str, np.ndarray], out: pathlib.Path) -> None:
    """Write ``tensors`` with the template's names, order and dtypes as an uncompressed npz."""
    specs = {name: (arr.shape, arr.dtype) for name, arr in read(template).items()}
    arrays = conform(template, specs, tensors)
    # Same layout as np.savez (stored, zip64, "<name>.npy" members), written directly because
    # np.savez's own parameters ("file", "allow_pickle") would collide with tensor names.
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, arr in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


def _corrupt(path: pathlib.Path, error: Exception | str) -> ModelFormatError:
    return ModelFormatError(
        f"{path}: not a readable .npz archive (corrupt or truncated?): {error}; "
        "re-save it with np.savez"
    )
