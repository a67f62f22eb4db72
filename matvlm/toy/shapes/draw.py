"""Drawing a Shapes-VQA scene: exact colours, no antialiasing (`render`)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from .scene import BACKGROUND, COLORS, HALF_EXTENT, Scene, Shape

# ----------------------------------------------------------------------------- rendering

def shape_box(shape: Shape, grid: int, image_size: int) -> tuple[int, int, int, int]:
    """Integer bounding box (x0, y0, x1, y1), inclusive, of a shape centred in its cell."""
    cell = image_size / grid
    cx, cy = (shape.col + 0.5) * cell, (shape.row + 0.5) * cell
    h = HALF_EXTENT[shape.size] * cell
    return round(cx - h), round(cy - h), round(cx + h), round(cy + h)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as a `size` x `size` RGB image (PIL.ImageDraw, no antialiasing)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, x1, y1 = shape_box(s, scene.grid, size)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle, apex up
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return img
