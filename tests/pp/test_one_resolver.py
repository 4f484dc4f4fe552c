"""One coordinate-system resolver and one affine builder (stsr._elements), and nothing else reads transformations."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from spatialdata.models import Image2DModel
from spatialdata.transformations import Affine, Identity, Scale, set_transformation

import stsr
from stsr._elements import element_affine, shared_coordinate_system

SRC = Path(stsr.__file__).parent
HOME = SRC / "_elements.py"


def _calls(pattern: str) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                found.setdefault(str(path.relative_to(SRC)), []).append(i)
    return found


def test_transformations_are_read_in_one_module_only():
    """``get_transformation(`` and ``to_affine_matrix(`` (reading a transformation, building its matrix) appear in
    stsr/_elements.py only: every other module picks its coordinate system with shared_coordinate_system and gets
    its affines from element_affine."""
    for pattern in (r"get_transformation\(", r"\.to_affine_matrix\("):
        found = _calls(pattern)
        # found where they are, and nowhere else
        assert set(found) == {"_elements.py"}, f"{pattern} outside stsr/_elements.py: {found}"


#: Modules that still call the old names (aliases of stsr._elements kept for them, not resolvers or builders of their
#: own); the list may only shrink: once they call shared_coordinate_system / element_affine, remove them from it and
#: delete the aliases (pp._transforms.affine_yx / all_transformations, _validate.shared_coordinate_systems,
#: _elements.resolve_coordinate_system).
LEGACY_CALLERS: set[str] = set()


def test_the_old_names_spread_no_further():
    """The aliases are called by the modules that already did only (``all_transformations`` also to copy an
    element's transformations, e.g. in pp/_downsample.py, where no affine is built)."""
    found = _calls(r"(?<![\w.])(?<!def )(affine_yx|shared_coordinate_systems|resolve_coordinate_system)\(")
    assert set(found) <= {"_elements.py", *LEGACY_CALLERS}, found
    found = _calls(r"(?<![\w.])all_transformations\(")
    assert set(found) <= {"pp/_downsample.py", *LEGACY_CALLERS}, found


def test_no_other_coordinate_system_resolver():
    """No module but stsr/_elements.py compares a coordinate system with "global" to pick one, or intersects the
    coordinate systems of two elements."""
    found = _calls(r"CS_GLOBAL in |\"global\" in |set\(.*coordinate_systems\(.*\) & ")
    assert set(found) <= {"_elements.py"}, f"coordinate-system choices outside stsr/_elements.py: {found}"


def _image(transformations):
    return Image2DModel.parse(
        np.zeros((1, 4, 6), np.uint8), dims=("c", "y", "x"), transformations=transformations
    )


def test_the_resolver(tiny_sd):
    # "global" preferred when shared
    set_transformation(tiny_sd["spots"], Identity(), to_coordinate_system="aligned")
    assert shared_coordinate_system(tiny_sd, ["img", "spots"]) == "global"
    # requested: honoured when every element has it, else the fix and close matches
    assert shared_coordinate_system(tiny_sd, ["img", "spots"], "aligned") == "aligned"
    with pytest.raises(
        ValueError,
        match=r"Image 'img' and spots 'spots' have no transformation to coordinate system 'pixels'\. Image 'img' is "
        r"in \['aligned', 'global'\]; spots 'spots' is in \['aligned', 'global'\] \(shared: \['aligned', 'global'\]\)"
        r"\..*set_transformation\(sdata\['img'\], transformation, to_coordinate_system='pixels'\)",
    ):
        shared_coordinate_system(tiny_sd, ["img", "spots"], "pixels", names=("image", "spots"))
    with pytest.raises(ValueError, match="'globl'. Did you mean 'global'"):
        shared_coordinate_system(tiny_sd, ["img", "spots"], "globl")
    set_transformation(tiny_sd["spots"], Identity(), to_coordinate_system="pixels")
    with pytest.raises(ValueError, match=r"^Image 'img' has no transformation to coordinate system 'pixels'"):
        shared_coordinate_system(tiny_sd, ["img", "spots"], "pixels")
    # no "global": the only shared system, else the first shared one (alphabetical)
    set_transformation(tiny_sd["spots"], {"b": Identity(), "a": Identity()}, set_all=True)
    for name, tf in (
        ("img", {"a": Identity(), "b": Identity(), "c": Identity()}),
        ("only_b", {"b": Identity()}),
    ):
        tiny_sd.images[name] = _image(tf)
    assert shared_coordinate_system(tiny_sd, ["img", "spots"]) == "a"
    assert shared_coordinate_system(tiny_sd, ["only_b", "spots"]) == "b"
    assert shared_coordinate_system(tiny_sd, "only_b") == "b"
    # none shared
    tiny_sd.images["elsewhere"] = _image({"c": Identity()})
    with pytest.raises(
        ValueError,
        match=r"Image 'elsewhere' \(coordinate systems \['c'\]\) and shape 'spots' \(coordinate systems "
        r"\['a', 'b'\]\) share no coordinate system.*set_transformation",
    ):
        shared_coordinate_system(tiny_sd, ["elsewhere", "spots"])
    # a plain mapping of elements works too
    assert shared_coordinate_system({"x": tiny_sd["only_b"]}, "x") == "b"


def test_the_affine_builder(tiny_sd):
    c, s = np.cos(0.4), np.sin(0.4)
    rot = Affine(
        np.array([[c, -s, 3.0], [s, c, 1.0], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y")
    )
    tiny_sd.images["rot"] = Image2DModel.parse(
        np.zeros((1, 8, 8), np.uint8),
        dims=("c", "y", "x"),
        transformations={"global": rot},
        scale_factors=[2],
    )
    m = element_affine(tiny_sd["rot"], "global", "rot")
    # (y, x) acting: x' = c x - s y + 3, y' = s x + c y + 1
    np.testing.assert_allclose(m, [[c, s, 1.0], [-s, c, 3.0], [0, 0, 1]], atol=1e-12)
    # level 1 pixels are twice as large
    np.testing.assert_allclose(element_affine(tiny_sd["rot"], "global", "rot", 1)[:2, :2], 2 * m[:2, :2])
    # between two elements: image "img" (2 µm px, offset (10, 20)) to "rot" pixels, through "global"
    between = element_affine(tiny_sd["img"], "global", "img", to=tiny_sd["rot"], to_key="rot")
    p = np.array([3.0, 5.0, 1.0])
    np.testing.assert_allclose(m @ between @ p, element_affine(tiny_sd["img"], "global", "img") @ p)
    np.testing.assert_allclose(element_affine(tiny_sd["img"], "aligned", "img"), np.diag([0.5, 0.5, 1.0]))
    with pytest.raises(
        ValueError, match="Element 'rot' has no transformation to coordinate system 'aligned'"
    ):
        element_affine(tiny_sd["rot"], "aligned", "rot")
    set_transformation(tiny_sd["rot"], Scale([2.0, 2.0], axes=("y", "x")), "aligned")
    assert element_affine(tiny_sd["rot"], "aligned", "rot")[0, 0] == 2.0
