"""Where the interesting part of a picture is, for crops that keep it: faces when OpenCV is installed
(``opencv-python-headless``, its bundled frontal-face Haar cascade), else a saliency map in numpy.

The result is plain data — an ``Interest`` grid of non-negative weights over the whole picture — so choosing the
crop (``best_offset``) is a pure function that tests drive with hand-made grids.

Saliency is the spectral residual of Hou & Zhang (2007): what is left of the log-amplitude spectrum after its local
average is removed marks the parts of the picture that are unlike the rest (a subject against its background),
which suits training crops better than plain edge density (busy backgrounds win there).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from lora_trainer.errors import UserError

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in the picture's pixels

SALIENCY_SIDE = 64  # the method's usual working size: coarse structure, not texture
FACE_DETECTION_SIDE = 640  # faces are found on a picture at most this large, then mapped back


@dataclass(frozen=True)
class Interest:
    """Weights on a coarse grid (rows, columns) spread evenly over the whole picture, and the faces found in it."""

    weights: np.ndarray
    faces: tuple[Box, ...] = ()


FACE_CASCADE = "haarcascade_frontalface_default.xml"


def face_detector_problem() -> str | None:
    """Why faces cannot be detected here (None when they can): OpenCV missing, or OpenCV 5, which dropped the Haar
    cascades from the main package."""
    try:
        import cv2
    except ImportError:
        return ("Face detection needs OpenCV: pip install \"opencv-python-headless<4.12\" into the same Python "
                "(4.12 and later need NumPy 2, which the WebUI's gradio 3 cannot use)")
    if not hasattr(cv2, "CascadeClassifier") or not (Path(cv2.data.haarcascades) / FACE_CASCADE).is_file():
        return (f"OpenCV {cv2.__version__} has no bundled Haar face detector (OpenCV 5 dropped it): "
                "pip install \"opencv-python-headless<4.12\"")
    return None


def face_detector_available() -> bool:
    return face_detector_problem() is None


def require_face_detector() -> None:
    problem = face_detector_problem()
    if problem:
        raise UserError(f"{problem}, or leave out --face-emphasis (focal crops then use saliency).")


@cache
def _face_cascade():
    import cv2

    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / FACE_CASCADE))
    if cascade.empty():
        raise UserError(f"OpenCV's bundled face detector ({FACE_CASCADE}) could not be loaded; reinstall opencv-python-headless.")
    return cascade


def detect_faces(rgb: np.ndarray) -> tuple[Box, ...]:
    """Frontal faces in an RGB array (height, width, 3), largest first; needs ``opencv-python-headless``."""
    require_face_detector()
    import cv2

    height, width = rgb.shape[:2]
    scale = min(1.0, FACE_DETECTION_SIDE / max(height, width))
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        grey = cv2.resize(grey, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    smallest = max(24, min(grey.shape) // 12)
    found = _face_cascade().detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
    boxes = [
        (round(x / scale), round(y / scale), min(width, round((x + w) / scale)), min(height, round((y + h) / scale)))
        for x, y, w, h in (found if len(found) else [])
    ]
    return tuple(sorted(boxes, key=lambda box: (-(box[2] - box[0]) * (box[3] - box[1]), box)))


def _box_blur(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)² window, edges repeated."""
    padded = np.pad(values, radius, mode="edge")
    summed = np.cumsum(np.cumsum(padded, axis=0), axis=1)
    summed = np.pad(summed, ((1, 0), (1, 0)))
    size = 2 * radius + 1
    total = summed[size:, size:] - summed[:-size, size:] - summed[size:, :-size] + summed[:-size, :-size]
    return total / (size * size)


def saliency_map(grey: np.ndarray) -> np.ndarray:
    """Spectral-residual saliency of a small grey array, scaled to [0, 1] (all zeros for a blank picture)."""
    pixels = np.asarray(grey, dtype=np.float64)
    spectrum = np.fft.fft2(pixels)
    log_amplitude = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amplitude - _box_blur(log_amplitude, 1)
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    for _ in range(3):  # three box blurs ≈ a Gaussian: one region, not speckles
        saliency = _box_blur(saliency, 2)
    if pixels.std() < 1e-6 or saliency.max() <= 0:
        return np.zeros_like(pixels)
    saliency -= saliency.min()
    return saliency / saliency.max()


def face_weights(size: tuple[int, int], faces: tuple[Box, ...], grid: tuple[int, int]) -> np.ndarray:
    """A grid whose cells are weighted by how much face they cover."""
    width, height = size
    rows, columns = grid
    weights = np.zeros(grid)
    for left, top, right, bottom in faces:
        y0, y1 = int(top * rows / height), max(int(top * rows / height) + 1, round(bottom * rows / height))
        x0, x1 = int(left * columns / width), max(int(left * columns / width) + 1, round(right * columns / width))
        weights[y0:y1, x0:x1] += 1.0
    return weights


def interest_of(image, use_faces: bool) -> Interest:
    """Faces when asked for and any are found, else saliency; ``image`` is an RGB Pillow image."""
    from PIL import Image

    width, height = image.size
    scale = SALIENCY_SIDE / max(width, height)
    grid = (max(1, round(height * scale)), max(1, round(width * scale)))
    if use_faces:
        faces = detect_faces(np.asarray(image))
        if faces:
            return Interest(face_weights(image.size, faces, grid), faces)
    small = image.convert("L").resize((grid[1], grid[0]), Image.Resampling.BOX)
    return Interest(saliency_map(np.asarray(small)))


def best_offset(profile: np.ndarray, length: int, window: int) -> int:
    """The start (in pixels of a side ``length`` long) of the ``window``-pixel span that holds the most of
    ``profile`` (weights of equal cells along that side). Ties go to the most central span, so a picture without a
    clear subject gets the centre crop."""
    if window >= length:
        return 0
    cells = np.asarray(profile, dtype=np.float64)
    per_pixel = cells[np.minimum((np.arange(length) * len(cells)) // length, len(cells) - 1)]
    cumulative = np.concatenate(([0.0], np.cumsum(per_pixel)))
    sums = cumulative[window:] - cumulative[:-window]
    centre = (length - window) // 2
    best = sums.max()
    if best <= 0:
        return centre
    candidates = np.nonzero(sums >= best * (1 - 1e-9))[0]  # float sums of equal spans differ in the last bits
    return int(candidates[np.argmin(np.abs(candidates - centre))])
