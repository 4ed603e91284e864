"""The image model behind ``octjepa synth``: OCT-like volumes from physical geometry, one B-scan at a time.

A curved, layered retina (RNFL ... RPE, choroid) with a foveal pit, multiplicative speckle and a device-specific
brightness, noise floor and retina depth. Every eye has an ``Anatomy``: continuous parameters drawn per
participant (overall layer thickness, inner-retina thinning, eye-wall curvature, retina depth, pit depth, foci and
cyst rates). ``synth`` writes each volume's realised values to a side table, so probes have known answers.
``study_group`` moves some of them: inner-retina thinning, hyperreflective foci and (mostly insulin-dependent)
intraretinal cysts grow with severity, sized to stay visible at coarse grids (the demo's 0.4 x 0.04 x 0.1 mm
voxels: thinning of up to ~2 axial voxels, foci and cysts a few tenths of a mm across).
Deterministic for a given ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

STUDY_GROUPS = (
    "healthy",
    "pre_diabetes_lifestyle_controlled",
    "oral_medication_and_or_non_insulin_injectable_medication_controlled",
    "insulin_dependent",
)

# Layers from the inner limiting membrane down: (name, healthy thickness mm, reflectivity 0..1).
_LAYERS = (
    ("rnfl", 0.030, 0.80),
    ("gcl_ipl", 0.075, 0.45),
    ("inl", 0.035, 0.18),
    ("opl", 0.030, 0.50),
    ("onl", 0.075, 0.12),
    ("ellipsoid", 0.020, 0.85),
    ("ost", 0.020, 0.30),
    ("rpe", 0.030, 1.00),
)
_INNER = ("rnfl", "gcl_ipl", "inl", "opl")  # these vanish into the foveal pit and thin with disease
_CHOROID_MM, _CHOROID_REFL = 0.25, 0.55
_PAD = 32
_NOMINAL_MM = sum(thick for _, thick, _ in _LAYERS)  # healthy retina thickness away from the fovea
_INNER_MM = sum(thick for name, thick, _ in _LAYERS if name in _INNER)
# Per severity (healthy .. insulin dependent): mean inner-retina thinning, foci and cysts per 36 mm^2 (6 x 6 mm).
_THINNING = (0.0, 0.15, 0.30, 0.45)
_FOCI_PER_36MM2 = (1.0, 8.0, 16.0, 24.0)
_CYSTS_PER_36MM2 = (0.0, 0.0, 1.0, 5.0)
_FOCUS_RADIUS_MM, _FOCUS_HALF_DEPTH_MM = 0.12, 0.02  # en-face radius, half axial extent
_CYST_RADIUS_MM = (0.10, 0.25)  # en-face radius range; the axial semi-axis is 0.6 x that

# The side table's columns, one row per volume: what a probe can be asked to predict (see `truth`).
ANATOMY_COLUMNS = (
    "retina_thickness_mm",
    "inner_thickness_mm",
    "inner_thinning",
    "curvature_per_mm",
    "retina_depth_mm",
    "pit_depth",
    "foci_count",
    "cyst_volume_mm3",
)


@dataclass(frozen=True)
class Style:
    """How one device renders: overall gain, background floor, speckle shape (higher = smoother, averaged scans)
    and where in the depth window the retina sits (fraction of the axial extent)."""

    gain: float
    floor: float
    speckle_k: float
    retina_top: float


@dataclass(frozen=True)
class Anatomy:
    """One participant's retina: the generator's parameters, shared by all of that participant's scans."""

    retina_scale: float  # every layer's healthy thickness times this
    inner_thinning: float  # fraction of the inner retina (RNFL..OPL) lost
    curvature: float  # eye wall: mm the retina rises per mm^2 of distance^2 from the centre
    depth_offset_mm: float  # the ILM's shift below the device's usual retina depth
    pit_depth: float  # fraction of the inner retina gone at the foveal centre
    foci_rate: float  # expected hyperreflective foci per 36 mm^2
    cyst_rate: float  # expected intraretinal cysts per 36 mm^2


@dataclass(frozen=True)
class Pathology:
    thinning: float  # fraction of inner-retina thickness lost
    foci: np.ndarray  # (N, 3) hyperreflective foci centres, (z mm, x mm, depth fraction within inner retina)
    cysts: np.ndarray  # (M, 4) cysts (z mm, x mm, radius mm, depth fraction within inl..onl)


def severity(study_group: str) -> int:
    if study_group not in STUDY_GROUPS:
        raise ValueError(f"study_group {study_group!r} is not one of {STUDY_GROUPS}")
    return STUDY_GROUPS.index(study_group)


def draw_anatomy(study_group: str, rng: np.random.Generator) -> Anatomy:
    """A participant's anatomy: group-driven means with participant-to-participant spread on every parameter."""
    s = severity(study_group)
    return Anatomy(
        retina_scale=float(rng.uniform(0.85, 1.2)),
        inner_thinning=float(np.clip(_THINNING[s] + rng.normal(0, 0.05), 0.0, 0.7)),
        curvature=float(rng.uniform(0.004, 0.02)),
        depth_offset_mm=float(rng.normal(0, 0.1)),
        pit_depth=float(rng.uniform(0.6, 0.95)),
        foci_rate=float(_FOCI_PER_36MM2[s] * rng.gamma(4.0, 0.25)),  # mean as the group's, CV 0.5
        cyst_rate=float(_CYSTS_PER_36MM2[s] * rng.gamma(4.0, 0.25)),
    )


def make_pathology(anatomy: Anatomy, extent_mm: float, rng: np.random.Generator) -> Pathology:
    area = (extent_mm / 6.0) ** 2
    half = extent_mm / 2
    n_foci = rng.poisson(anatomy.foci_rate * area)
    foci = (
        np.column_stack(
            [rng.uniform(-half, half, n_foci), rng.uniform(-half, half, n_foci), rng.uniform(0.3, 0.95, n_foci)]
        )
        if n_foci
        else np.zeros((0, 3))
    )
    n_cysts = rng.poisson(anatomy.cyst_rate * area)
    cysts = (
        np.column_stack(
            [
                rng.normal(0, 0.8, n_cysts),
                rng.normal(0, 0.8, n_cysts),
                rng.uniform(*_CYST_RADIUS_MM, n_cysts),
                rng.uniform(0.3, 0.7, n_cysts),
            ]
        )
        if n_cysts
        else np.zeros((0, 4))
    )
    return Pathology(thinning=anatomy.inner_thinning, foci=foci, cysts=cysts)


def truth(anatomy: Anatomy, path: Pathology, retina_top_mm: float) -> dict[str, float]:
    """The side table's values for one volume (``ANATOMY_COLUMNS``): thicknesses away from the fovea, the eye
    wall's curvature, the ILM's depth below the scan's first row at the centre, and the foci and cysts drawn."""
    inner = _INNER_MM * anatomy.retina_scale * (1.0 - anatomy.inner_thinning)
    cyst_volume = sum(4.0 / 3.0 * math.pi * r * r * (0.6 * r) for _, _, r, _ in path.cysts)
    values = {
        "retina_thickness_mm": (_NOMINAL_MM - _INNER_MM) * anatomy.retina_scale + inner,
        "inner_thickness_mm": inner,
        "inner_thinning": anatomy.inner_thinning,
        "curvature_per_mm": anatomy.curvature,
        "retina_depth_mm": retina_top_mm,
        "pit_depth": anatomy.pit_depth,
        "foci_count": float(len(path.foci)),
        "cyst_volume_mm3": cyst_volume,
    }
    return {k: round(float(values[k]), 6) for k in ANATOMY_COLUMNS}


def _bscan(
    x_mm: np.ndarray,  # (W,) lateral position along the B-scan
    z_mm: np.ndarray,  # (W,) across-scan position of each A-scan
    *,
    ilm_mm: np.ndarray,  # (W,) where the inner limiting membrane of a healthy retina without a pit would be
    pit_mm: tuple[float, float],  # fovea centre (z, x); the pit shrinks the inner layers around it
    anatomy: Anatomy,
    path: Pathology,
    disc: bool,
    style: Style,
    speckle: np.ndarray,  # (H, W) multiplicative, mean 1
    dy: float,
) -> np.ndarray:
    h = speckle.shape[0]
    rows = np.arange(h, dtype=np.int32)[:, None]  # (H, 1)
    r2 = (z_mm - pit_mm[0]) ** 2 + (x_mm - pit_mm[1]) ** 2
    pit = np.exp(-r2 / (2 * 0.4**2))  # 1 at the foveal centre
    # Layer boundaries per A-scan in rows; a pixel's layer is the number of boundaries above it
    # (integer compares and a table lookup: several times cheaper than smooth per-layer ramps).
    thicknesses = []
    for name, thick, _ in _LAYERS:
        thick = thick * anatomy.retina_scale
        t = np.full_like(ilm_mm, thick)
        if name in _INNER:
            t = t * (1.0 - path.thinning) * (1.0 - anatomy.pit_depth * pit)
        elif name == "onl":
            t = t * (1.0 + 0.6 * pit)
        if disc:  # the optic disc has no outer retina, only a thick nerve-fibre rim
            t = np.where(np.abs(x_mm) < 0.8, thick * 6 if name == "rnfl" else 0.0, t)
        thicknesses.append(t)
    # The RPE follows the smooth eye-wall curve; a thinner retina (pit, disease) lowers the ILM instead.
    bounds = [ilm_mm + _NOMINAL_MM * anatomy.retina_scale - np.sum(thicknesses, axis=0)]
    for t in thicknesses:
        bounds.append(bounds[-1] + t)
    edges = [np.rint(b / dy).astype(np.int32) for b in bounds]
    layer = np.zeros(speckle.shape, dtype=np.uint8)
    for e in edges:
        layer += rows >= e[None, :]
    table = np.array([0.02] + [v for _, _, v in _LAYERS] + [0.0], dtype=np.float32)
    refl = table[layer]
    # Choroid: bright under the RPE, fading with depth (a lookup by rows below the RPE); absent in the disc.
    below = np.clip(rows - edges[-1][None, :], 0, h - 1)
    fade = (_CHOROID_REFL * np.exp(-np.arange(h) * dy / (_CHOROID_MM * 0.6))).astype(np.float32)
    choroid = fade[below]
    if disc:
        choroid[:, np.abs(x_mm) < 0.8] = 0.0
    refl = np.where(layer == len(edges), choroid, refl)

    inner_top, inner_bottom = bounds[0], bounds[len(_INNER)]  # (W,) mm
    depth = rows * dy  # (H, 1) mm
    for zc, xc, frac in path.foci:  # flat ellipsoids within the inner retina
        across = ((z_mm - zc) ** 2 + (x_mm - xc) ** 2) / _FOCUS_RADIUS_MM**2
        cols = np.nonzero(across < 1.0)[0]
        if cols.size:
            centre = inner_top[cols] + frac * (inner_bottom[cols] - inner_top[cols])
            inside = across[cols][None, :] + ((depth - centre[None, :]) / _FOCUS_HALF_DEPTH_MM) ** 2 < 1.0
            refl[:, cols] = np.where(inside, 0.95, refl[:, cols])
    for zc, xc, rad, frac in path.cysts:  # dark ellipsoids around the inner/outer retina boundary
        across = ((z_mm - zc) ** 2 + (x_mm - xc) ** 2) / rad**2
        cols = np.nonzero(across < 1.0)[0]
        if cols.size:
            centre = inner_bottom[cols] - 0.05 + frac * 0.1
            dist2 = across[cols][None, :] + (depth - centre[None, :]) ** 2 / (0.6 * rad) ** 2
            refl[:, cols] = np.where(dist2 < 1.0, 0.03, refl[:, cols])
    return (style.gain * refl + style.floor) * speckle


def render_volume(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    *,
    style: Style,
    anatomy: Anatomy,
    rng: np.random.Generator,
    radial: bool = False,
    dtype: type = np.uint8,
) -> tuple[np.ndarray, dict[str, float]]:
    """A ``(D, H, W)`` OCT-like volume of ``anatomy`` and its known values (``truth``); ``radial`` renders
    B-scans through an optic disc at evenly spaced angles."""
    d, h, w = shape
    dz, dy, dx = spacing_mm
    extent = max(w * dx, d * dz)
    path = make_pathology(anatomy, extent, rng)
    x = ((np.arange(w) - (w - 1) / 2) * dx).astype(np.float32)  # (W,)
    pit = (rng.normal(0, 0.1), rng.normal(0, 0.15))
    tilt = rng.normal(0, 0.01, size=2)
    curvature = anatomy.curvature
    # The curvature term keeps the edges of the scan (which rise) inside the window.
    top = style.retina_top * h * dy + curvature * extent**2 / 4 + anatomy.depth_offset_mm
    peak = float(np.iinfo(dtype).max)
    out = np.empty(shape, dtype=dtype)
    # Speckle: B-scans take shifted windows of a small bank (sampling gamma noise per frame dominated the cost).
    bank = rng.standard_gamma(style.speckle_k, size=(4, h + _PAD, w + _PAD), dtype=np.float32) / style.speckle_k
    for i in range(d):  # one B-scan at a time keeps generation memory at a few frames
        if radial:
            angle = np.pi * i / d
            zz, xx = np.sin(angle) * x, np.cos(angle) * x
            along = x
        else:
            zz = np.full_like(x, (i - (d - 1) / 2) * dz)
            xx = along = x
        ilm = top - curvature * (zz**2 + xx**2) + tilt[0] * zz + tilt[1] * xx
        if radial:
            ilm = ilm + 0.35 * np.exp(-(along**2) / (2 * 0.35**2))  # the cup
        b, oy, ox = rng.integers(len(bank)), rng.integers(_PAD), rng.integers(_PAD)
        speckle = bank[b, oy : oy + h, ox : ox + w]
        image = _bscan(
            along if radial else xx,
            zz,
            ilm_mm=ilm,
            pit_mm=(99.0, 99.0) if radial else pit,
            anatomy=anatomy,
            path=path,
            disc=radial,
            style=style,
            speckle=speckle,
            dy=dy,
        )
        out[i] = np.clip(image * peak + 0.5, 0, peak).astype(dtype)
    return out, truth(anatomy, path, top)


def oct_volume(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    *,
    style: Style,
    study_group: str,
    rng: np.random.Generator,
    radial: bool = False,
    dtype: type = np.uint8,
) -> np.ndarray:
    """A ``(D, H, W)`` OCT-like volume of a fresh participant of ``study_group`` (see ``render_volume``)."""
    anatomy = draw_anatomy(study_group, rng)
    return render_volume(shape, spacing_mm, style=style, anatomy=anatomy, rng=rng, radial=radial, dtype=dtype)[0]


def anatomy_record(anatomy: Anatomy) -> dict[str, float]:
    """The participant-level parameters, as a flat dict (for summaries and tests)."""
    return {k: round(float(v), 6) for k, v in asdict(anatomy).items()}
