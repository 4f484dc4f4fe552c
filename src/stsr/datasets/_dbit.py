"""DBiT-seq FFPE mouse embryo "FFPE-2" (Liu et al. 2020): a 50 x 50 grid of 25 µm pixels with a bright-field image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import shapely
from spatialdata import SpatialData

from stsr._constants import IMAGE_BRIGHTFIELD, SHAPES_SPOTS, TABLE

from ._build import count_table, polygons, read_dense_counts
from ._fetch import data_path
from ._images import image_size, image_to_global, lazy_image

_DATASET = "dbit_mouse_embryo_ffpe2"
#: Grid geometry: 50 x 50 channels, 25 µm wide, separated by gaps of the same width (pitch 50 µm).
DBIT_GRID = 50
DBIT_PIXEL_UM = 25.0
DBIT_PITCH_UM = 50.0
#: Grid rows (Y) with 3-5x fewer UMI than their neighbours: probably blocked channels.
DBIT_DEFECTIVE_ROWS = (2, 39)


def _parse_ids(ids: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    xy = ids.str.split("x", expand=True)
    return xy.get_level_values(0).astype(int).to_numpy(), xy.get_level_values(1).astype(int).to_numpy()


def dbit_mouse_embryo() -> SpatialData:
    """Load the DBiT-seq FFPE mouse embryo section "FFPE-2" (2,499 pixels of 25 µm x 15,880 genes).

    Returns
    -------
    A :class:`~spatialdata.SpatialData` in the ``"global"`` coordinate system in µm, with origin at the top-left
    corner of DBiT pixel (X, Y) = (1, 1):

    - image ``"brightfield"``: lazy multiscale RGB uint8 (a grayscale micrograph stored as RGB), cropped exactly to
      the DBiT working area. Following the authors' ``Pixel_identification.m``, pixel (X, Y) covers image columns
      ``[2(X-1)pw, 2(X-1)pw + pw)`` with ``pw = W / 99`` (rows likewise with ``ph = H / 99``); with a 50 µm pitch
      this is an anisotropic ``Scale`` of ``25 / ph`` (y) and ``25 / pw`` (x) µm per image pixel;
    - shapes ``"spots"``: one 25 µm square polygon per measured pixel, ``[50(X-1), 50(X-1) + 25)`` in x and
      likewise in y, index ``0..n-1``;
    - table ``"table"``: raw UMI counts (``float32`` CSR, integer values) with ``obs`` ``array_row`` (Y),
      ``array_col`` (X), ``in_tissue`` (listed in ``position.txt``), ``defective_row`` (Y in {2, 39}),
      ``region`` = ``"spots"``, ``instance_id``; ``uns["spatial_meta"]`` holds ``pixel_size_um`` (25),
      ``pitch_um`` (50), ``um_per_px_x``, ``um_per_px_y`` and ``defective_rows``.

    Notes
    -----
    The 159 MB dense TSV is parsed straight into a sparse matrix (about 2 s), so no converted cache is kept.
    """
    counts, ids, genes = read_dense_counts(
        data_path(_DATASET, "FFPE-2_exp_matrix.zip"), "FFPE-2_exp_matrix.tsv"
    )
    col, row = _parse_ids(ids)
    if col.min() < 1 or row.min() < 1 or col.max() > DBIT_GRID or row.max() > DBIT_GRID:
        raise ValueError(f"DBiT pixel ids outside the {DBIT_GRID} x {DBIT_GRID} grid.")
    tissue_ids = {t.strip() for t in data_path(_DATASET, "position.txt").read_text().split(",") if t.strip()}

    n = len(ids)
    instance_ids = np.arange(n)
    x0 = (col - 1) * DBIT_PITCH_UM
    y0 = (row - 1) * DBIT_PITCH_UM
    squares = polygons(shapely.box(x0, y0, x0 + DBIT_PIXEL_UM, y0 + DBIT_PIXEL_UM), index=instance_ids)

    image_path = data_path(_DATASET, "FFPE-2.jpg")
    height, width = image_size(image_path)
    span_px = 2 * DBIT_GRID - 1  # 50 channels + 49 gaps, each one channel wide
    um_per_px_x = DBIT_PIXEL_UM / (width / span_px)
    um_per_px_y = DBIT_PIXEL_UM / (height / span_px)
    image = lazy_image([image_path], "RGB", ("r", "g", "b"), image_to_global((um_per_px_y, um_per_px_x)))

    obs = pd.DataFrame(
        {
            "array_row": row,
            "array_col": col,
            "in_tissue": ids.isin(tissue_ids),
            "defective_row": np.isin(row, DBIT_DEFECTIVE_ROWS),
        },
        index=ids,
    )
    meta = {
        "dataset": _DATASET,
        "pixel_size_um": DBIT_PIXEL_UM,
        "pitch_um": DBIT_PITCH_UM,
        "um_per_px_x": um_per_px_x,
        "um_per_px_y": um_per_px_y,
        "defective_rows": list(DBIT_DEFECTIVE_ROWS),
        "image_key": IMAGE_BRIGHTFIELD,
    }
    table = count_table(counts, obs, genes, region=SHAPES_SPOTS, instance_ids=instance_ids, meta=meta)
    return SpatialData(
        images={IMAGE_BRIGHTFIELD: image}, shapes={SHAPES_SPOTS: squares}, tables={TABLE: table}
    )
