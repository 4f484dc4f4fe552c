"""Xenium human lung (HEST NCBI858) with H&E: the tiny 200-cell DeepSpot fixture."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData

from stsr._constants import IMAGE_HE, SHAPES_CELLS, TABLE

from ._build import circles, count_table
from ._fetch import data_path
from ._images import image_to_global, lazy_image

_DATASET = "xenium_lung_he_ncbi858_tiny"
#: The JPG is a 10x downsample of the HEST full-resolution H&E (0.2125 µm/px).
XENIUM_UM_PER_PX = 2.125


def xenium_lung_tiny() -> SpatialData:
    """Load the tiny Xenium lung fixture (HEST NCBI858, 200 cells x 338 genes) with its H&E.

    The cells are a sparse subsample of the section: use it to test the cell-level path, not as a benchmark.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` in the ``"global"`` coordinate system in µm:

    - image ``"he"``: lazy multiscale RGB uint8, ``Scale`` of 2.125 µm per pixel;
    - shapes ``"cells"``: one circle per cell of radius ``cell_diameter / 2`` (10 µm, from ``NCBI858.json``),
      centred at ``(col, row) = (y_pixel, x_pixel)`` times the pixel size: the h5ad's ``x_pixel`` is the image
      ROW and ``y_pixel`` the COLUMN (names swapped, checked against the tissue);
    - table ``"table"``: counts (``float32`` CSR) with the h5ad's ``obs`` and ``var``, ``region`` = ``"cells"``
      and ``instance_id``; ``uns["spatial_meta"]`` holds ``um_per_px`` and ``cell_diameter_um``.
    """
    cells_ad = ad.read_h5ad(data_path(_DATASET, "NCBI858.h5ad"))
    meta_json = json.loads(data_path(_DATASET, "NCBI858.json").read_text())
    diameter_um = float(meta_json["cell_diameter"])

    n = cells_ad.n_obs
    instance_ids = np.arange(n)
    col_px = cells_ad.obs["y_pixel"].to_numpy(dtype=np.float64)  # swapped names, see docstring
    row_px = cells_ad.obs["x_pixel"].to_numpy(dtype=np.float64)
    cells = circles(np.c_[col_px, row_px] * XENIUM_UM_PER_PX, diameter_um / 2, index=instance_ids)

    var = cells_ad.var.copy()
    gene_names = var["gene_symbol"].astype(str) if "gene_symbol" in var else pd.Series(cells_ad.var_names)
    meta = {
        "dataset": _DATASET,
        "um_per_px": XENIUM_UM_PER_PX,
        "cell_diameter_um": diameter_um,
        "image_key": IMAGE_HE,
    }
    table = count_table(
        cells_ad.X,
        cells_ad.obs,
        gene_names,
        region=SHAPES_CELLS,
        instance_ids=instance_ids,
        meta=meta,
        var=var,
    )
    image = lazy_image(
        [data_path(_DATASET, "NCBI858.jpg")],
        "RGB",
        ("r", "g", "b"),
        image_to_global((XENIUM_UM_PER_PX, XENIUM_UM_PER_PX)),
    )
    return SpatialData(images={IMAGE_HE: image}, shapes={SHAPES_CELLS: cells}, tables={TABLE: table})
