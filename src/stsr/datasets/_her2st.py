"""HER2ST (Andersson et al. 2021): legacy Spatial Transcriptomics of HER2+ breast tumours with H&E."""

from __future__ import annotations

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from stsr._constants import IMAGE_HE, SHAPES_SPOTS, TABLE

from ._build import circles, count_table, fit_pitch_px, read_dense_counts
from ._fetch import REGISTRY, data_path
from ._images import image_to_global, lazy_image

#: Sections with a full-resolution H&E JPG (~0.69 µm/px), in the ``her2st`` data folder.
HER2ST_FULLRES_SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
#: Patient A sections with the HER2ST Shiny app's downscaled, background-masked PNG (~3.2 µm/px).
HER2ST_APP_SECTIONS = ("A1", "A2")
#: Every section :func:`her2st` can load.
HER2ST_SECTIONS = HER2ST_APP_SECTIONS + HER2ST_FULLRES_SECTIONS

#: Legacy ST geometry: 100 µm spots whose centres are 200 µm apart (one array unit).
SPOT_DIAMETER_UM = 100.0
SPOT_PITCH_UM = 200.0

#: The app PNGs carry a thumbnail of the A1 annotation in the top-right corner: columns >= 1490, rows <= 545.
_APP_OVERLAY_COL_MIN, _APP_OVERLAY_ROW_MAX = 1490, 545


def _spot_ids(frame: pd.DataFrame) -> pd.Index:
    return pd.Index(frame["x"].astype(int).astype(str) + "x" + frame["y"].astype(int).astype(str))


def _image_file(dataset: str, section: str) -> str:
    (name,) = (f for f in REGISTRY[dataset] if f.startswith(f"images/{section}_"))
    return name


def _spot_pixels(dataset: str, section: str, selection: pd.DataFrame) -> pd.DataFrame:
    """Spot centres ``(col, row)`` in pixels of the section's image, indexed by spot id."""
    if section in HER2ST_APP_SECTIONS:
        # The app PNG is a stretched, (for A2) rotated version of the full-res frame; positions were derived from
        # the app's warped coordinates, see the her2st_patientA_app README.
        app = pd.read_csv(data_path(dataset, "spots/app_spot_coords.csv"))
        app = app[app["section"] == section].set_index("spot_id")
        return app[["app_col", "app_row"]].set_axis(["col", "row"], axis=1)
    return selection[["pixel_x", "pixel_y"]].set_axis(["col", "row"], axis=1)


def _cluster_labels(dataset: str, section: str, spot_ids: pd.Index) -> pd.Categorical:
    labels = pd.read_csv(data_path(dataset, f"cluster_labels/{section}-cluster-annotation.tsv.gz"), sep="\t")
    by_spot = pd.Series(labels["label"].astype(str).to_numpy(), index=_spot_ids(labels))
    categories = sorted(by_spot.unique(), key=lambda v: (len(v), v))  # "2" before "10"
    return pd.Categorical(by_spot.reindex(spot_ids).to_numpy(), categories=categories)


def her2st(section: str = "C2") -> SpatialData:
    """Load one HER2ST section (legacy ST, HER2+ breast cancer) with its H&E image.

    Sections B4 and C2-C6 come with the full-resolution H&E (~0.69 µm/px; folder ``her2st``). Sections A1 and
    A2 (patient A) come with the HER2ST app's downscaled PNG (~3.2 µm/px; folder ``her2st_patientA_app``), whose
    background is masked to black and whose top-right corner holds an annotation thumbnail (see
    ``uns["spatial_meta"]["overlay_box_px"]``, ``(x_min, y_min, x_max, y_max)`` in image pixels); A2 is shown registered into A1's frame.

    Parameters
    ----------
    section
        One of :data:`HER2ST_SECTIONS`.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` whose elements all map to the ``"global"`` coordinate system in µm:

    - image ``"he"``: lazy multiscale RGB uint8, ``Scale`` (µm per pixel along y, x) to ``"global"``;
    - shapes ``"spots"``: one 100 µm circle (``radius`` 50) per spot with counts, index ``0..n-1``;
    - table ``"table"``: raw UMI counts (``float32`` CSR, integer values), ``obs`` with ``spot_id`` (``"<x>x<y>"``),
      ``array_row`` (y), ``array_col`` (x), ``cluster`` (the authors' expression clusters, categorical, NaN where
      missing), ``section``, ``region`` = ``"spots"`` and ``instance_id``; ``uns["spatial_meta"]`` holds
      ``spot_diameter_um`` (100), ``spot_pitch_um`` (200), ``um_per_px`` (geometric mean), ``um_per_px_x``,
      ``um_per_px_y``, ``pitch_px_x``, ``pitch_px_y`` and ``pitch_fit_residual_px``.

    The pixel size is derived per section: an affine least-squares fit of the spot pixel positions against the
    fiducial-adjusted array coordinates (``new_x``, ``new_y``) gives the pitch in pixels per array unit along
    each axis, and one array unit is 200 µm. Spot centres are the pixel positions times that pixel size, so
    spots and image agree exactly in ``"global"``.

    Raises
    ------
    ValueError
        If ``section`` is not one of :data:`HER2ST_SECTIONS`.
    """
    if section not in HER2ST_SECTIONS:
        raise ValueError(
            f"Unknown HER2ST section {section!r}; sections with an image are {list(HER2ST_SECTIONS)}."
        )
    dataset = "her2st_patientA_app" if section in HER2ST_APP_SECTIONS else "her2st"

    counts, spot_ids, genes = read_dense_counts(data_path(dataset, f"counts/{section}.tsv.gz"))
    selection = pd.read_csv(data_path(dataset, f"spots/{section}_selection.tsv"), sep="\t")
    selection.index = _spot_ids(selection)
    pixels = _spot_pixels(dataset, section, selection)
    missing = spot_ids.difference(selection.index.intersection(pixels.index))
    if len(missing):
        raise ValueError(f"HER2ST {section}: counted spots without a position: {list(missing)[:5]}.")

    common = selection.index.intersection(pixels.index)
    pitch_x, pitch_y, residual = fit_pitch_px(
        selection.loc[common, ["new_x", "new_y"]].to_numpy(), pixels.loc[common, ["col", "row"]].to_numpy()
    )
    um_per_px_x, um_per_px_y = SPOT_PITCH_UM / pitch_x, SPOT_PITCH_UM / pitch_y

    n = len(spot_ids)
    instance_ids = np.arange(n)
    centres_um = pixels.loc[spot_ids, ["col", "row"]].to_numpy() * [um_per_px_x, um_per_px_y]
    spots = circles(centres_um, SPOT_DIAMETER_UM / 2, index=instance_ids)

    obs = pd.DataFrame(
        {
            "spot_id": spot_ids.to_numpy(),
            "array_row": selection.loc[spot_ids, "y"].to_numpy(dtype=np.int64),
            "array_col": selection.loc[spot_ids, "x"].to_numpy(dtype=np.int64),
            "cluster": _cluster_labels(dataset, section, spot_ids),
            "section": pd.Categorical([section] * n),
        },
        index=spot_ids,
    )
    image_file = _image_file(dataset, section)
    image = lazy_image(
        [data_path(dataset, image_file)], "RGB", ("r", "g", "b"), image_to_global((um_per_px_y, um_per_px_x))
    )
    meta = {
        "dataset": dataset,
        "section": section,
        "spot_diameter_um": SPOT_DIAMETER_UM,
        "spot_pitch_um": SPOT_PITCH_UM,
        "um_per_px": float(np.sqrt(um_per_px_x * um_per_px_y)),
        "um_per_px_x": um_per_px_x,
        "um_per_px_y": um_per_px_y,
        "pitch_px_x": pitch_x,
        "pitch_px_y": pitch_y,
        "pitch_fit_residual_px": residual,
        "image_key": IMAGE_HE,
        "image_file": image_file,
    }
    if section in HER2ST_APP_SECTIONS:
        meta["background_masked_black"] = True
        # (x_min, y_min, x_max, y_max) in full-resolution image pixels; mask it for image-only training.
        width = image["scale0"]["image"].sizes["x"]
        meta["overlay_box_px"] = [_APP_OVERLAY_COL_MIN, 0, width, _APP_OVERLAY_ROW_MAX + 1]
    table = count_table(counts, obs, genes, region=SHAPES_SPOTS, instance_ids=instance_ids, meta=meta)
    return SpatialData(images={IMAGE_HE: image}, shapes={SHAPES_SPOTS: spots}, tables={TABLE: table})
