"""Vizgen MERFISH mouse brain, the GiottoData mini crop: transcripts, DAPI/polyT images and cell polygons."""

from __future__ import annotations

import numpy as np
import pandas as pd
import shapely
from spatialdata import SpatialData
from spatialdata.models import PointsModel
from spatialdata.transformations import Identity

from stsr._constants import CS_GLOBAL, GENE_COLUMN, IMAGE_MORPHOLOGY, POINTS_TRANSCRIPTS, SHAPES_CELLS

from ._build import polygons
from ._fetch import data_path
from ._images import image_size, image_to_global, lazy_image

_DATASET = "vizgen_mouse_brain_mini"
#: Image extent in global µm, from GiottoData's ``mini_vizgen_script.R``:
#: ``terra::ext(6400.029, 6900.037, -5150.007, -4699.967)`` with ``negative_y = TRUE``.
_EXTENT_X_UM = (6400.029, 6900.037)
_EXTENT_Y_UM = (4699.967, 5150.007)  # row 0 is the smallest global_y
VIZGEN_Z_PLANES = (0, 1)


def _cell_polygons(z: int) -> tuple[list[shapely.Polygon], list[str]]:
    frame = pd.read_csv(data_path(_DATASET, f"cell_boundaries/z{z}_polygons.csv.gz"), dtype={"poly_ID": str})
    ids, starts = np.unique(frame["poly_ID"].to_numpy(), return_index=True)
    order = np.argsort(starts)  # keep file order
    codes = pd.Categorical(frame["poly_ID"], categories=ids[order]).codes
    if np.any(np.diff(codes) < 0):
        raise ValueError(f"Cell boundaries z{z}: vertices of one cell are not contiguous.")
    coords = np.c_[frame["x"].to_numpy(), -frame["y"].to_numpy()]  # the file stores y = -global_y
    rings = shapely.linearrings(coords, indices=codes)
    return list(shapely.make_valid(shapely.polygons(rings))), [str(i) for i in ids[order]]


def vizgen_mouse_brain_mini(z: int = 1) -> SpatialData:
    """Load the Vizgen MERFISH mouse-brain mini crop (500 x 450 µm, GiottoData).

    Parameters
    ----------
    z
        The z plane (0 or 1) of the morphology image and of the cell polygons.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` in the ``"global"`` coordinate system (Vizgen µm):

    - image ``"morphology"``: lazy multiscale uint8, channels ``("DAPI", "polyT")`` of plane ``z``, placed with the
      extent of GiottoData's crop script (``Scale`` of ~0.1086 µm/px then ``Translation``; row 0 is the
      smallest ``global_y``);
    - points ``"transcripts"``: every transcript of BOTH planes except ``Blank-*`` controls, ``x``/``y`` in µm,
      categorical ``gene``, and ``global_z`` (filter on it for one plane);
    - shapes ``"cells"``: Vizgen cell segmentation polygons of plane ``z`` (the file's negated y undone), indexed
      by the Vizgen cell id.

    Raises
    ------
    ValueError
        If ``z`` is not 0 or 1.
    """
    if z not in VIZGEN_Z_PLANES:
        raise ValueError(
            f"Unknown z plane {z!r} of the Vizgen mini crop; choose one of {list(VIZGEN_Z_PLANES)}."
        )

    paths = [data_path(_DATASET, f"images/mini_dataset_{name}_z{z}.jpg") for name in ("dapi", "polyT")]
    height, width = image_size(paths[0])
    um_per_px_x = (_EXTENT_X_UM[1] - _EXTENT_X_UM[0]) / width
    um_per_px_y = (_EXTENT_Y_UM[1] - _EXTENT_Y_UM[0]) / height
    image = lazy_image(
        paths,
        "L",
        ("DAPI", "polyT"),
        transformation=image_to_global((um_per_px_y, um_per_px_x), (_EXTENT_Y_UM[0], _EXTENT_X_UM[0])),
    )

    tx = pd.read_csv(data_path(_DATASET, "vizgen_transcripts.csv.gz"))
    tx = tx[~tx["gene"].str.startswith("Blank-")].reset_index(drop=True)
    tx[GENE_COLUMN] = pd.Categorical(tx["gene"])
    tx["global_z"] = tx["global_z"].astype(np.int8)
    points = PointsModel.parse(
        tx,
        coordinates={"x": "global_x", "y": "global_y"},
        feature_key=GENE_COLUMN,
        transformations={CS_GLOBAL: Identity()},
    )

    geometry, cell_ids = _cell_polygons(z)
    cells = polygons(geometry, index=cell_ids)
    return SpatialData(
        images={IMAGE_MORPHOLOGY: image}, points={POINTS_TRANSCRIPTS: points}, shapes={SHAPES_CELLS: cells}
    )
