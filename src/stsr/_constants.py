"""Default keys and names, in one place."""

from __future__ import annotations

#: Name of the coordinate system in micrometres that every stsr dataset provides.
CS_GLOBAL = "global"

#: Default element keys of the datasets.
IMAGE_HE = "he"
IMAGE_MORPHOLOGY = "morphology"
IMAGE_BRIGHTFIELD = "brightfield"
SHAPES_SPOTS = "spots"
SHAPES_CELLS = "cells"
POINTS_TRANSCRIPTS = "transcripts"
TABLE = "table"
RASTER_HR_TRUTH = "hr_truth"
RASTER_LR = "lr"

#: Default ``key_added`` of :func:`stsr.tl.super_resolve`.
KEY_SUPER_RESOLVE = "stsr"
#: Default ``key_added`` of :func:`stsr.tl.prior_map`.
KEY_PRIOR_MAP = "stsr_prior"

#: Column names.
GENE_COLUMN = "gene"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"

#: Attribute key under which stsr records provenance in element attrs.
PROVENANCE_ATTR = "stsr"

#: Environment variable naming the local data directory laid out like ``../shared/data``.
DATA_DIR_ENV = "STSR_DATA_DIR"
