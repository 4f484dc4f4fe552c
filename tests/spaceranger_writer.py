"""Test helper (not shipped): Export the real datasets to the on-disk layouts of 10x Genomics Space Ranger (Visium and Visium HD).

:func:`write_visium_folder` turns a HER2ST section into a Space Ranger Visium ``outs/`` folder and
:func:`write_visium_hd_folder` turns the DBiT-seq grid into a Visium HD ``outs/`` folder with one square-bin size.
Both write exactly the files that :func:`spatialdata_io.visium` / :func:`spatialdata_io.visium_hd` read, and
return the keyword arguments to pass to that reader, e.g.::

    kwargs = write_visium_folder("C2", "c2_visium")
    sdata = spatialdata_io.visium("c2_visium", **kwargs)

The files follow the Space Ranger formats (10x HDF5 feature-barcode matrix, ``tissue_positions.csv`` /
``tissue_positions.parquet``, ``scalefactors_json.json``, ``tissue_hires_image.png`` / ``tissue_lowres_image.png``);
what cannot be derived from the source data is stated in each function's notes.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image

from stsr.datasets._build import read_dense_counts
from stsr.datasets._fetch import REGISTRY, data_path

__all__ = ["write_visium_folder", "write_visium_hd_folder", "write_synthetic_visium_folder"]

_HER2ST = "her2st"
_DBIT = "dbit_mouse_embryo_ffpe2"
_HER2ST_SPOT_DIAMETER_UM = 100.0
_HER2ST_PITCH_UM = 200.0
_DBIT_GRID = 50
#: DBiT channel width; the image spans 2 * 50 - 1 = 99 channel widths per axis (channels and gaps alternate).
_DBIT_CHANNEL_UM = 25.0
_DBIT_IMAGE_CHANNELS = 2 * _DBIT_GRID - 1
#: Visium's fiducial / spot diameter ratio (~144.5 / 89.5 px); the readers do not use the fiducial diameter.
_FIDUCIAL_RATIO = 1.615
_SOFTWARE = "stsr.datasets (Space Ranger layout export; not produced by Space Ranger)"


# ---------------------------------------------------------------------------------------------------------------------
# shared writers
# ---------------------------------------------------------------------------------------------------------------------
def _write_10x_h5(
    file: Path,
    counts: sp.csr_matrix,
    barcodes: Sequence[str],
    gene_names: Sequence[str],
    genome: str,
    library_id: str,
    chemistry: str,
) -> None:
    """Write a 10x Genomics feature-barcode matrix HDF5 (Cell Ranger >= 3 / Space Ranger layout).

    ``counts`` is ``barcodes x genes``; the file stores the ``genes x barcodes`` CSC matrix, whose arrays are those
    of the ``barcodes x genes`` CSR matrix.
    """
    csr = sp.csr_matrix(counts)
    csr.sum_duplicates()
    csr.sort_indices()
    values = csr.data
    if values.size and (np.any(values < 0) or np.any(values != np.round(values))):
        raise ValueError("Counts must be non-negative integers to be written as a 10x matrix.")
    n_obs, n_genes = csr.shape
    genes = np.asarray([str(g).encode() for g in gene_names], dtype="S")
    with h5py.File(file, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = np.int64(2)
        f.attrs["library_ids"] = np.asarray([library_id.encode()], dtype="S")
        f.attrs["original_gem_groups"] = np.asarray([1], dtype=np.int64)
        f.attrs["chemistry_description"] = chemistry
        f.attrs["software_version"] = _SOFTWARE
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.asarray([str(b).encode() for b in barcodes], dtype="S"))
        m.create_dataset("data", data=values.astype(np.int32), compression="gzip")
        m.create_dataset("indices", data=csr.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=csr.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.asarray([n_genes, n_obs], dtype=np.int32))
        feats = m.create_group("features")
        # Gene symbols double as ids: the sources have no Ensembl ids.
        feats.create_dataset("id", data=genes)
        feats.create_dataset("name", data=genes)
        feats.create_dataset("feature_type", data=np.full(n_genes, b"Gene Expression", dtype="S15"))
        feats.create_dataset("genome", data=np.full(n_genes, genome.encode(), dtype=f"S{len(genome)}"))
        feats.create_dataset("_all_tag_keys", data=np.asarray([b"genome"], dtype="S"))


def _select_genes(
    counts: sp.csr_matrix, var_names: pd.Index, genes: Sequence[str] | None, n_genes: int | None
) -> np.ndarray:
    """Column indices of the genes to export: ``genes`` in their order, else the ``n_genes`` with most UMI."""
    if genes is not None and n_genes is not None:
        raise ValueError("Pass either `genes` or `n_genes`, not both.")
    if genes is not None:
        if isinstance(genes, str):
            genes = [genes]
        missing = [g for g in genes if g not in var_names]
        if missing:
            raise ValueError(
                f"{len(missing)} gene(s) not in the dataset, e.g. {missing[:10]}; pass symbols from its count table."
            )
        return var_names.get_indexer(list(genes))
    if n_genes is None:
        return np.arange(len(var_names))
    if not 1 <= n_genes <= len(var_names):
        raise ValueError(f"`n_genes` must be between 1 and {len(var_names)}, got {n_genes}.")
    totals = np.asarray(counts.sum(axis=0)).ravel()
    return np.sort(np.argsort(-totals, kind="stable")[:n_genes])


def _write_pyramid_pngs(
    source: Path | Image.Image, folder: Path, hires: int, lowres: int
) -> tuple[float, float]:
    """Write ``tissue_hires_image.png`` and ``tissue_lowres_image.png`` (long side at most ``hires``/``lowres``).

    ``source`` is an image file (JPEGs are decoded at a reduced DCT scale, never below the target size) or an
    in-memory image. Returns the scale factors (image pixels per full-resolution pixel) as Space Ranger defines them.
    """
    width, height = (_open(source) if isinstance(source, Path) else source).size
    scalefs = []
    for name, target in (("tissue_hires_image.png", hires), ("tissue_lowres_image.png", lowres)):
        scalef = min(1.0, target / max(width, height))
        size = (max(1, round(width * scalef)), max(1, round(height * scalef)))
        image = _open(source) if isinstance(source, Path) else source.copy()
        if size[0] < width and size[1] < height:
            image.draft("RGB", size)  # JPEG only; a no-op otherwise
        image.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(folder / name)
        scalefs.append(scalef)
    return scalefs[0], scalefs[1]


def _open(path: Path) -> Image.Image:
    """Open a trusted image file (the H&E slides exceed PIL's decompression-bomb warning size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _write_json(file: Path, content: dict[str, Any]) -> None:
    file.write_text(json.dumps(content, indent=2) + "\n")


def _write_visium_scalefactors(
    spatial: Path, hires_scalef: float, lowres_scalef: float, spot_diameter: float
) -> None:
    """``spatial/scalefactors_json.json`` of a Visium folder (``fiducial_diameter_fullres`` from Visium's
    fiducial/spot ratio, unused by readers)."""
    _write_json(
        spatial / "scalefactors_json.json",
        {
            "tissue_hires_scalef": hires_scalef,
            "tissue_lowres_scalef": lowres_scalef,
            "fiducial_diameter_fullres": spot_diameter * _FIDUCIAL_RATIO,
            "spot_diameter_fullres": spot_diameter,
        },
    )


def _visium_like_barcodes(keys: np.ndarray) -> list[str]:
    """Deterministic, distinct 16-nt barcodes (``"ACGT...-1"``) for distinct non-negative integer ``keys``."""
    # multiplication by an odd constant is a bijection modulo 2**32 = 4**16
    mixed = (keys.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(4**16)
    out = []
    for v in mixed.tolist():
        out.append("".join("ACGT"[(v >> (2 * k)) & 3] for k in range(16)) + "-1")
    return out


def _source(data_dir: str | os.PathLike[str] | None, dataset: str, filename: str) -> Path:
    """``data_dir/filename`` if ``data_dir`` is given, else the project's data file (local or downloaded)."""
    if data_dir is None:
        return data_path(dataset, filename)
    file = Path(data_dir) / filename
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist; `data_dir` must be the `{dataset}` dataset folder (leave it None to use "
            f"$STSR_DATA_DIR/{dataset} or the public download)."
        )
    return file


def _prepare_folder(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Create ``path``; with ``overwrite``, first remove a previous export there (a folder with ``spatial/``)."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass overwrite=True or choose another path."
            )
        if not (out / "spatial").is_dir():
            raise FileExistsError(
                f"{out} is not empty and does not look like a Space Ranger folder (no spatial/); refusing to "
                "delete it. Choose another path."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Visium (HER2ST)
# ---------------------------------------------------------------------------------------------------------------------
def _her2st_image_name(section: str, data_dir: str | os.PathLike[str] | None) -> str:
    if data_dir is not None:
        found = sorted((Path(data_dir) / "images").glob(f"{section}_*.jpg"))
        names = [f"images/{p.name}" for p in found]
    else:
        names = sorted(
            f for f in REGISTRY[_HER2ST] if f.startswith(f"images/{section}_") and f.endswith(".jpg")
        )
    if not names:
        raise ValueError(
            f"HER2ST section {section!r} has no full-resolution H&E image here; sections with one: B4, C2-C6."
        )
    return names[0]


def _her2st_um_per_px(spots: pd.DataFrame) -> float:
    """Full-resolution pixel size: spot pitch in pixels (fit against the fiducial-adjusted array coordinates)."""
    pitch_x = np.polyfit(spots["new_x"], spots["pixel_x"], 1)[0]
    pitch_y = np.polyfit(spots["new_y"], spots["pixel_y"], 1)[0]
    return _HER2ST_PITCH_UM / float(np.sqrt(abs(pitch_x * pitch_y)))


def write_visium_folder(
    section: str,
    path: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    genes: Sequence[str] | None = None,
    n_genes: int | None = None,
    dataset_id: str | None = None,
    barcodes: Literal["coords", "10x"] = "coords",
    fullres_image: bool = False,
    prefix_files: bool = False,
    hires_size: int = 2000,
    lowres_size: int = 600,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write a HER2ST section as a Space Ranger (>= 2.0) Visium output folder.

    Parameters
    ----------
    section
        HER2ST section with a full-resolution H&E image: ``"B4"``, ``"C2"``, ..., ``"C6"``.
    path
        Output folder (created; must be empty or absent unless ``overwrite``).
    data_dir
        The ``her2st`` dataset folder (with ``counts/``, ``spots/``, ``images/``). Default: ``$STSR_DATA_DIR/her2st``,
        else the public download (:func:`stsr.datasets.data_path`).
    genes
        Gene symbols to export, in this order.
    n_genes
        Export the ``n_genes`` genes with most UMI in the section (in the count table's order). Default (neither
        ``genes`` nor ``n_genes``): all genes.
    dataset_id
        Library / dataset id. Default ``f"her2st_{section}"``.
    barcodes
        ``"coords"``: ``"<x>x<y>-1"`` from the ST array coordinates (joins back to the count table);
        ``"10x"``: deterministic 16-nt barcodes ``"ACGT...-1"`` (one per spot, distinct).
    fullres_image
        Also copy the full-resolution JPEG to ``<path>/tissue_image.jpg`` (the Space Ranger *input* image; the
        reader loads it when given ``fullres_image_file``).
    prefix_files
        Name the matrix ``<dataset_id>_filtered_feature_bc_matrix.h5`` so that the reader infers ``dataset_id``.
    hires_size, lowres_size
        Long side of ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` in pixels (Space Ranger: 2000 / 600).
    overwrite
        Replace a non-empty ``path``.

    Returns
    -------
    Keyword arguments for :func:`spatialdata_io.visium`: ``dataset_id`` and, with ``fullres_image``,
    ``fullres_image_file``.

    Notes
    -----
    Files written (Space Ranger ``outs/`` names)::

        filtered_feature_bc_matrix.h5         10x HDF5, spots with counts x genes, int32 UMI, genome "GRCh38"
        spatial/tissue_positions.csv          barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres
        spatial/scalefactors_json.json        tissue_hires_scalef, tissue_lowres_scalef, spot_diameter_fullres,
                                              fiducial_diameter_fullres
        spatial/tissue_hires_image.png        RGB, long side ``hires_size``
        spatial/tissue_lowres_image.png       RGB, long side ``lowres_size``

    - ``tissue_positions.csv`` lists every spot of the section's spot file (all under tissue, ``in_tissue`` = 1),
      including the few without counts, which the filtered matrix omits (as Space Ranger's filtered matrix only has
      barcodes with data). ``array_row`` / ``array_col`` are the legacy-ST array ``y`` / ``x`` (a square grid at
      200 µm pitch, not Visium's hexagonal one). Pixel positions are rounded to integers, as Space Ranger writes them.
    - ``spot_diameter_fullres`` = 100 µm divided by the section's pixel size, which is fitted from the spot pitch
      (200 µm) against the fiducial-adjusted array coordinates (about 0.688 µm/px, i.e. about 145 px);
      ``fiducial_diameter_fullres`` uses Visium's fiducial/spot ratio (unused by readers).
    - Gene symbols double as feature ids (the source has no Ensembl ids).
    """
    dataset_id = f"her2st_{section}" if dataset_id is None else dataset_id
    if barcodes not in ("coords", "10x"):
        raise ValueError(f"`barcodes` must be 'coords' or '10x', got {barcodes!r}.")
    image_name = _her2st_image_name(section, data_dir)
    spots = pd.read_csv(_source(data_dir, _HER2ST, f"spots/{section}_selection.tsv"), sep="\t")
    counts, obs_names, var_names = read_dense_counts(_source(data_dir, _HER2ST, f"counts/{section}.tsv.gz"))
    keep = _select_genes(counts, var_names, genes, n_genes)
    counts, var_names = counts[:, keep], var_names[keep]

    spots = spots[spots["selected"] == 1].copy()
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    missing = obs_names.difference(spots.index)
    if len(missing):
        raise ValueError(f"HER2ST {section}: count rows {list(missing[:5])} have no spot in the spot file.")
    if barcodes == "coords":
        spots["barcode"] = spots.index + "-1"
    else:
        spots["barcode"] = _visium_like_barcodes(spots["x"].to_numpy() * 1000 + spots["y"].to_numpy())

    out = _prepare_folder(path, overwrite)
    spatial = out / "spatial"
    spatial.mkdir()
    counts_name = f"{dataset_id}_" if prefix_files else ""
    _write_10x_h5(
        out / f"{counts_name}filtered_feature_bc_matrix.h5",
        counts,
        spots.loc[obs_names, "barcode"].tolist(),
        var_names,
        genome="GRCh38",
        library_id=dataset_id,
        chemistry="Spatial Transcriptomics (legacy ST, HER2ST), exported as Visium",
    )
    positions = pd.DataFrame(
        {
            "barcode": spots["barcode"].to_numpy(),
            "in_tissue": 1,
            "array_row": spots["y"].to_numpy(),
            "array_col": spots["x"].to_numpy(),
            "pxl_row_in_fullres": np.round(spots["pixel_y"].to_numpy()).astype(int),
            "pxl_col_in_fullres": np.round(spots["pixel_x"].to_numpy()).astype(int),
        }
    )
    positions.to_csv(spatial / "tissue_positions.csv", index=False)

    image_file = _source(data_dir, _HER2ST, image_name)
    hires_scalef, lowres_scalef = _write_pyramid_pngs(image_file, spatial, hires_size, lowres_size)
    spot_diameter = _HER2ST_SPOT_DIAMETER_UM / _her2st_um_per_px(spots)
    _write_visium_scalefactors(spatial, hires_scalef, lowres_scalef, spot_diameter)
    kwargs = {"dataset_id": dataset_id}
    if fullres_image:
        shutil.copyfile(image_file, out / "tissue_image.jpg")
        kwargs["fullres_image_file"] = "tissue_image.jpg"
    return kwargs


#: Space Ranger's ``spot_diameter_fullres`` is the diameter of a theoretical 65 µm spot (the capture area is 55 µm).
_SPACERANGER_SPOT_UM = 65.0


def write_synthetic_visium_folder(
    sdata: Any,
    path: str | os.PathLike[str],
    *,
    image_key: str = "he",
    spots_key: str = "spots",
    table_key: str = "table",
    dataset_id: str = "synthetic",
    hires_size: int = 2000,
    lowres_size: int = 600,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write a slide of :func:`stsr.datasets.synthetic` (Visium geometry, in µm) as a Space Ranger Visium folder.

    The full-resolution image is the slide's H&E at its own pixel size (``um_per_px``); spot positions are its
    pixels (rounded, as Space Ranger writes them); ``spot_diameter_fullres`` follows Space Ranger's convention, the
    diameter of a 65 µm spot in full-resolution pixels (not the 55 µm of the spots' footprint); ``array_row`` /
    ``array_col`` are Visium's hexagonal array coordinates (columns doubled, odd rows shifted). Spots with tissue are
    ``in_tissue`` = 1 and the filtered matrix holds them. Returns the keyword arguments for
    :func:`spatialdata_io.visium` (``dataset_id``).
    """
    from spatialdata.transformations import get_transformation

    out = _prepare_folder(path, overwrite)
    spatial = out / "spatial"
    spatial.mkdir()
    scale = np.diag(get_transformation(sdata[image_key], "global").to_affine_matrix(("y", "x"), ("y", "x")))[
        :2
    ]
    if not np.allclose(scale, scale[0]):
        raise ValueError(f"image {image_key!r} must have square pixels, got {scale} µm per pixel.")
    um_per_px = float(scale[0])
    image = np.asarray(sdata[image_key]["scale0"]["image"].values).transpose(1, 2, 0)
    hires_scalef, lowres_scalef = _write_pyramid_pngs(
        Image.fromarray(image), spatial, hires_size, lowres_size
    )

    spots = sdata[spots_key]
    table = sdata[table_key]
    xy = np.stack([spots.geometry.x.to_numpy(), spots.geometry.y.to_numpy()], 1)
    # columns lie half a pitch apart (odd rows shifted), rows sqrt(3) / 2 pitch apart
    half = float(np.median(np.diff(np.unique(np.round(xy[:, 0], 3)))))
    rows = np.round((xy[:, 1] - xy[:, 1].min()) / (half * np.sqrt(3))).astype(int)
    cols = np.round((xy[:, 0] - xy[:, 0].min()) / half).astype(int)
    barcodes = _visium_like_barcodes(np.arange(len(spots)))
    counts = sp.csr_matrix(table.X)
    position = spots.index.get_indexer(table.obs["instance_id"])  # each table row's spot
    if np.any(position < 0):
        raise ValueError(f"table {table_key!r} has rows whose instance_id is no spot of {spots_key!r}.")
    keep = np.flatnonzero(np.asarray(counts.sum(1)).ravel() > 0)  # rows with counts: the filtered matrix
    in_tissue = np.zeros(len(spots), bool)
    in_tissue[position[keep]] = True
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue.astype(int),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": np.round(xy[:, 1] / um_per_px).astype(int),
            "pxl_col_in_fullres": np.round(xy[:, 0] / um_per_px).astype(int),
        }
    )
    positions.to_csv(spatial / "tissue_positions.csv", index=False)
    _write_10x_h5(
        out / "filtered_feature_bc_matrix.h5",
        counts[keep],
        [barcodes[i] for i in position[keep]],
        [str(g) for g in table.var_names],
        genome="synthetic",
        library_id=dataset_id,
        chemistry="Visium-like export of stsr.datasets.synthetic",
    )
    spot_diameter = _SPACERANGER_SPOT_UM / um_per_px
    _write_visium_scalefactors(spatial, hires_scalef, lowres_scalef, spot_diameter)
    return {"dataset_id": dataset_id}


# ---------------------------------------------------------------------------------------------------------------------
# Visium HD (DBiT-seq)
# ---------------------------------------------------------------------------------------------------------------------
def _dbit_xy(ids: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    parts = ids.str.split("x", expand=True)
    x = parts.get_level_values(0).astype(int).to_numpy()
    y = parts.get_level_values(1).astype(int).to_numpy()
    if x.min() < 1 or y.min() < 1 or x.max() > _DBIT_GRID or y.max() > _DBIT_GRID:
        raise ValueError(f"DBiT pixel ids outside the {_DBIT_GRID} x {_DBIT_GRID} grid.")
    return x, y


def write_visium_hd_folder(
    path: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    genes: Sequence[str] | None = None,
    n_genes: int | None = None,
    dataset_id: str = "dbit_ffpe2",
    bin_size_um: int = 50,
    px_per_channel: int = 8,
    fullres_image: bool = True,
    prefix_files: bool = False,
    hires_size: int = 6000,
    lowres_size: int = 600,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the DBiT-seq FFPE-2 mouse-embryo grid as a Visium HD (Space Ranger 3) output with one bin size.

    Each DBiT pixel becomes one square bin of ``bin_size_um`` centred on the pixel.

    Parameters
    ----------
    path
        Output folder (created; must be empty or absent unless ``overwrite``).
    data_dir
        The ``dbit_mouse_embryo_ffpe2`` dataset folder. Default: ``$STSR_DATA_DIR/dbit_mouse_embryo_ffpe2``, else the
        public download (:func:`stsr.datasets.data_path`).
    genes, n_genes
        Genes to export (see :func:`write_visium_folder`); default all 15,880.
    dataset_id
        Dataset id (element name prefix).
    bin_size_um
        Side of the square bins in µm, an integer (the folder is ``square_{bin_size_um:03d}um``). ``50`` (default):
        bins tile the chip at the DBiT pitch of 50 µm, as Visium HD bins do (each bin = one 25 µm DBiT pixel plus
        half of the 25 µm gaps around it). ``25``: the true DBiT pixel footprint, leaving 25 µm gaps between bins
        (a layout real Visium HD never has).
    px_per_channel
        Full-resolution image pixels per 25 µm DBiT channel width. The source micrograph is anisotropic (~7.35 x
        7.21 px per channel) while Visium HD has one ``microns_per_pixel``, so it is resampled to
        ``99 * px_per_channel`` pixels square: ``microns_per_pixel = 25 / px_per_channel`` (3.125 by default).
    fullres_image
        Write the resampled micrograph as ``<prefix>tissue_image.png`` (found by the reader automatically).
    prefix_files
        Prefix ``feature_slice.h5`` and ``tissue_image.png`` with ``<dataset_id>_`` so the reader infers
        ``dataset_id``.
    hires_size, lowres_size
        Long side of ``tissue_hires_image.png`` / ``tissue_lowres_image.png``, never larger than the full-resolution
        image (Space Ranger HD: 6000 / 600).
    overwrite
        Replace a non-empty ``path``.

    Returns
    -------
    Keyword arguments for :func:`spatialdata_io.visium_hd`: ``dataset_id``, ``bin_size`` and
    ``load_segmentations_only=False``.

    Notes
    -----
    Files written (Space Ranger HD ``outs/`` names; ``XXX`` = ``bin_size_um``)::

        feature_slice.h5                      only its ``metadata_json`` attribute (file format 1.0 layout and
                                              transform matrices): the reader needs nothing else of it
        tissue_image.png                      full-resolution (resampled) micrograph, RGB
        spatial/tissue_hires_image.png, spatial/tissue_lowres_image.png, spatial/scalefactors_json.json
        binned_outputs/square_XXXum/filtered_feature_bc_matrix.h5   bins under tissue (``position.txt``)
        binned_outputs/square_XXXum/raw_feature_bc_matrix.h5        all 2,500 bins (the one pixel absent from the
                                                                    source, X=7 Y=2, with zero counts)
        binned_outputs/square_XXXum/spatial/tissue_positions.parquet  all 2,500 bins
        binned_outputs/square_XXXum/spatial/scalefactors_json.json    adds bin_size_um, microns_per_pixel

    - Barcodes are ``s_XXXum_<row:05d>_<col:05d>-1`` with ``array_row = Y - 1`` and ``array_col = X - 1`` (DBiT
      pixel ``(X, Y)``, X the column). Bin centres in full-resolution pixels: ``pxl_col_in_fullres = (2(X-1) + 0.5)
      * px_per_channel``, ``pxl_row_in_fullres = (2(Y-1) + 0.5) * px_per_channel`` (pixel edges at integers), which
      follows the authors' pixel-to-image mapping and assumes the 50 µm pitch of the DBiT-seq README.
    - The micrograph is grayscale stored as RGB; it is not H&E.
    """
    if not isinstance(bin_size_um, int | np.integer) or not 1 <= bin_size_um <= 999:
        raise ValueError(f"`bin_size_um` must be an integer number of µm in [1, 999], got {bin_size_um!r}.")
    if not isinstance(px_per_channel, int | np.integer) or px_per_channel < 1:
        raise ValueError(f"`px_per_channel` must be a positive integer, got {px_per_channel!r}.")
    counts, obs_names, var_names = read_dense_counts(
        _source(data_dir, _DBIT, "FFPE-2_exp_matrix.zip"), "FFPE-2_exp_matrix.tsv"
    )
    keep = _select_genes(counts, var_names, genes, n_genes)
    counts, var_names = sp.csr_matrix(counts[:, keep]), var_names[keep]
    tissue = {t.strip() for t in _source(data_dir, _DBIT, "position.txt").read_text().split(",") if t.strip()}

    # every grid position, row-major over (Y, X); measured rows are placed at their position
    gy, gx = np.meshgrid(np.arange(1, _DBIT_GRID + 1), np.arange(1, _DBIT_GRID + 1), indexing="ij")
    gx, gy = gx.ravel(), gy.ravel()
    grid_ids = pd.Index([f"{x}x{y}" for x, y in zip(gx, gy)])
    _dbit_xy(obs_names)
    where = grid_ids.get_indexer(obs_names)
    if np.any(where < 0) or len(set(where)) != len(where):
        raise ValueError("DBiT pixel ids are malformed or duplicated.")
    placement = sp.csr_matrix(
        (np.ones(len(where)), (where, np.arange(len(where)))), shape=(len(grid_ids), len(obs_names))
    )
    grid_counts = sp.csr_matrix(placement @ counts)
    bin_label = f"{bin_size_um:03d}um"
    barcodes = [f"s_{bin_label}_{y - 1:05d}_{x - 1:05d}-1" for x, y in zip(gx, gy)]
    in_tissue = grid_ids.isin(list(tissue))

    out = _prepare_folder(path, overwrite)
    prefix = f"{dataset_id}_" if prefix_files else ""
    um_per_px = _DBIT_CHANNEL_UM / px_per_channel
    side = _DBIT_IMAGE_CHANNELS * px_per_channel
    source = _open(_source(data_dir, _DBIT, "FFPE-2.jpg")).convert("RGB")
    fullres = source.resize((side, side), Image.Resampling.LANCZOS)
    spatial = out / "spatial"
    spatial.mkdir()
    hires_scalef, lowres_scalef = _write_pyramid_pngs(fullres, spatial, hires_size, lowres_size)
    if fullres_image:
        fullres.save(out / f"{prefix}tissue_image.png")
    spot_diameter = bin_size_um / um_per_px
    scalefactors = {
        "spot_diameter_fullres": spot_diameter,
        "bin_size_um": float(bin_size_um),
        "microns_per_pixel": um_per_px,
        "regist_target_img_scalef": hires_scalef,
        "tissue_lowres_scalef": lowres_scalef,
        "fiducial_diameter_fullres": spot_diameter * _FIDUCIAL_RATIO,
        "tissue_hires_scalef": hires_scalef,
    }
    _write_json(spatial / "scalefactors_json.json", scalefactors)

    bins = out / "binned_outputs" / f"square_{bin_label}"
    (bins / "spatial").mkdir(parents=True)
    _write_json(bins / "spatial" / "scalefactors_json.json", scalefactors)
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue.astype(np.int32),
            "array_row": (gy - 1).astype(np.int32),
            "array_col": (gx - 1).astype(np.int32),
            "pxl_row_in_fullres": (2 * (gy - 1) + 0.5) * px_per_channel,
            "pxl_col_in_fullres": (2 * (gx - 1) + 0.5) * px_per_channel,
        }
    )
    positions.to_parquet(bins / "spatial" / "tissue_positions.parquet", index=False)
    h5_kwargs = {
        "gene_names": var_names,
        "genome": "mm10",
        "library_id": dataset_id,
        "chemistry": "DBiT-seq FFPE (25 um channels, 50 um pitch), exported as Visium HD",
    }
    _write_10x_h5(bins / "raw_feature_bc_matrix.h5", grid_counts, barcodes, **h5_kwargs)
    _write_10x_h5(
        bins / "filtered_feature_bc_matrix.h5",
        grid_counts[np.flatnonzero(in_tissue)],
        [b for b, t in zip(barcodes, in_tissue) if t],
        **h5_kwargs,
    )

    # feature_slice.h5: the reader reads only the metadata attribute. 2 µm "spot" col/row -> microscope col/row.
    spot_to_px = [2.0 / um_per_px, 0.0, 0.0, 0.0, 2.0 / um_per_px, 0.0, 0.0, 0.0, 1.0]
    px_to_spot = [um_per_px / 2.0, 0.0, 0.0, 0.0, um_per_px / 2.0, 0.0, 0.0, 0.0, 1.0]
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    n_spots = int(np.ceil(_DBIT_IMAGE_CHANNELS * _DBIT_CHANNEL_UM / 2.0))
    metadata = {
        "hd_layout_json": json.dumps(
            {
                "file_format": "1.0",
                "num_cols": n_spots,
                "num_rows": n_spots,
                "spot_pitch": 2.0,
                "transform": identity,
            }
        ),
        "transform_matrices": {
            "spot_colrow_to_microscope_colrow": spot_to_px,
            "microscope_colrow_to_spot_colrow": px_to_spot,
            "spot_colrow_to_cytassist_colrow": identity,
            "cytassist_colrow_to_spot_colrow": identity,
        },
        "software_version": _SOFTWARE,
    }
    with h5py.File(out / f"{prefix}feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps(metadata)
    return {"dataset_id": dataset_id, "bin_size": bin_size_um, "load_segmentations_only": False}
