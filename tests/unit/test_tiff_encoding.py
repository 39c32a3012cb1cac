"""Float16 TIFF maps are deflate-compressed and read back bit-exactly by tifffile (as MVTec's checker reads)."""

from __future__ import annotations

import io

import numpy as np
import tifffile

from hybridad.run_dir import encode_tiff


def test_compressed_float16_tiff_round_trips_exactly() -> None:
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.random((64, 96)), axis=1).astype(np.float16)  # compressible
    special = np.array([0.0, -0.0, np.inf, -np.inf, 6e-8, 65504.0, -1.5], np.float16)
    smooth.reshape(-1)[: special.size] = special
    data = encode_tiff(smooth)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        back = tif.series[0].asarray()
    assert back.dtype == np.float16 and back.shape == smooth.shape
    assert np.array_equal(back.view(np.uint16), smooth.view(np.uint16))  # -0 and inf kept bit for bit
    raw = encode_tiff(smooth, zlib_level=0)
    assert len(data) < len(raw)
    assert np.array_equal(tifffile.imread(io.BytesIO(raw)).view(np.uint16), smooth.view(np.uint16))
