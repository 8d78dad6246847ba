"""Small image outputs drawn with PIL alone: the loss curve and sample grids."""

from __future__ import annotations

from pathlib import Path


def image_grid(images, columns: int):
    """Tile equally sized PIL images into a grid, `columns` wide."""
    from PIL import Image

    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def loss_plot(steps: list[int], losses: list[float], path: Path, title: str = "training loss",
              validation: tuple[list[int], list[float]] | None = None) -> None:
    """Write a PNG line chart of the raw loss, its moving average and (orange) the validation loss."""
    from PIL import Image, ImageDraw

    width, height, margin = 800, 400, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, 10), title, fill="black")
    val_steps, val_losses = validation if validation and validation[0] else ([], [])
    if steps:
        lo, hi = min(losses + val_losses), max(losses + val_losses)
        hi = hi if hi > lo else lo + 1e-8
        x0 = min(steps + val_steps)
        x1 = max(max(steps + val_steps), x0 + 1)

        def xy(step, value):
            x = margin + (step - x0) / (x1 - x0) * (width - 2 * margin)
            y = height - margin - (value - lo) / (hi - lo) * (height - 2 * margin)
            return x, y

        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(170, 190, 230), width=1)
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
        if val_steps:
            points = [xy(s, v) for s, v in zip(val_steps, val_losses)]
            draw.line(points if len(points) > 1 else points * 2, fill=(230, 120, 20), width=2)
            draw.text((width - margin - 120, 10), "validation", fill=(230, 120, 20))
        draw.text((5, margin - 5), f"{hi:.4g}", fill="black")
        draw.text((5, height - margin - 5), f"{lo:.4g}", fill="black")
        draw.text((margin, height - margin + 10), f"step {x0}", fill="black")
        draw.text((width - margin - 60, height - margin + 10), f"step {x1}", fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="gray")
    img.save(path)
