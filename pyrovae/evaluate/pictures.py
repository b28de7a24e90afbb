"""Pictures: labelled image grids (the CLI's ``reconstructions.png``: data above, reconstructions below), and those
of models that build an image over steps (DRAW, ConvDRAW): the canvas after each step as a grid, the attention
windows drawn on the canvases, and an animated GIF of generation.

The functions take a ``trajectory`` dict: ``canvas`` ``[T, B, C, H, W]`` in [0, 1] and optionally ``read`` and
``write`` boxes ``[T, B, 4]`` = (x0, y0, x1, y1) in pixels (what the models' and guides' ``trajectory`` return).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from pyrovae.utils.files import atomic_write


def save_atomic(path, write) -> Path:
    """Call ``write(file, format)`` on a temporary file beside ``path`` and rename it over ``path``
    (:func:`~pyrovae.utils.files.atomic_write`): a reader never sees half a picture, and an evaluation killed
    mid-write leaves the previous one. ``format`` is the image format of the extension (``png``, ``jpeg``, ``gif``)."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG").lower()
    atomic_write(path, lambda f: write(f, fmt))
    return path


def labelled_grids(panels: list[tuple[str, torch.Tensor]], path, nrow: int = 8) -> Path:
    """One PNG of image grids stacked top to bottom, each titled with its label: ``panels`` = ``[(label, [N, C, H, W]
    or [N, D] images in [0, 1]), ...]`` (flat data is shown as one row of pixels per image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    grids = []
    for _, images in panels:
        images = images.detach().float().cpu().clamp(0, 1)
        images = images[:, None, None, :] if images.dim() == 2 else images[:, None] if images.dim() == 3 else images
        grids.append(make_grid(images, nrow=nrow, padding=2, pad_value=1.0))
    width = max(g.shape[2] for g in grids)
    heights = [g.shape[1] for g in grids]
    scale = 6 / width
    fig, axes = plt.subplots(len(grids), 1, figsize=(6, sum(heights) * scale + 0.4 * len(grids)), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (label, _), grid in zip(axes[:, 0], panels, grids):
        ax.imshow(_displayable(grid), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save_atomic(path, lambda f, fmt: fig.savefig(f, format=fmt, dpi=max(100, int(width / 6))))
    plt.close(fig)
    return Path(path)


def step_grid(canvas: torch.Tensor, path, max_steps: int = 64) -> Path:
    """PNG grid of canvases: rows = examples, columns = steps (at most ``max_steps`` columns, evenly spaced, last kept)."""
    from torchvision.utils import save_image

    steps = _steps(canvas.shape[0], max_steps)
    images = canvas[steps].transpose(0, 1).float().cpu().clamp(0, 1)  # [B, S, C, H, W]
    save_atomic(path, lambda f, fmt: save_image(images.reshape(-1, *images.shape[2:]), f, format=fmt, nrow=len(steps), padding=1))
    return Path(path)


def generation_gif(canvas: torch.Tensor, path, scale: int = 2, ms_per_step: int = 80) -> Path:
    """Animated GIF of the canvases of ``B`` examples drawn side by side, one frame per step (the last one held)."""
    from PIL import Image
    from torchvision.utils import make_grid

    frames = []
    nrow = math.ceil(math.sqrt(canvas.shape[1]))
    for c in canvas.float().cpu().clamp(0, 1):
        grid = make_grid(c, nrow=nrow, padding=1, pad_value=1.0)
        array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        image = Image.fromarray(array if array.shape[2] == 3 else array[:, :, 0])
        frames.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    durations = [ms_per_step] * (len(frames) - 1) + [1500]
    save_atomic(path, lambda f, fmt: frames[0].save(f, format=fmt, save_all=True, append_images=frames[1:], duration=durations, loop=0))
    return Path(path)


def attention_figure(trajectory: dict, path, data: Optional[torch.Tensor] = None, max_examples: int = 4, max_steps: int = 8) -> Path:
    """Canvases at a few steps with the read (red) and write (green) windows; first column the data image, if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    canvas = trajectory["canvas"].float().cpu()
    steps = _steps(canvas.shape[0], max_steps)
    rows = min(max_examples, canvas.shape[1])
    cols = len(steps) + (data is not None)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows), squeeze=False)
    for r in range(rows):
        panels = [("data", data[r].float().cpu(), None)] if data is not None else []
        panels += [(f"t={t + 1}", canvas[t, r], t) for t in steps]
        for ax, (title, image, t) in zip(axes[r], panels):
            ax.imshow(_displayable(image), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if t is None:
                continue
            for key, colour in (("read", "red"), ("write", "lime")):
                if key in trajectory:
                    x0, y0, x1, y1 = trajectory[key][t, r].float().cpu().tolist()
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor=colour, linewidth=1))
    fig.suptitle("read (red) and write (green) windows", fontsize=8)
    fig.tight_layout()
    save_atomic(path, lambda f, fmt: fig.savefig(f, format=fmt, dpi=100))
    plt.close(fig)
    return Path(path)


def write_draw_pictures(model, guide, data: Optional[torch.Tensor], run_dir, num: int = 8, suffix: str = "") -> list[Path]:
    """The DRAW pictures of a trained model into ``run_dir``: ``draw_generation.png`` / ``.gif`` (from the prior;
    skipped for a conditional model, which needs contexts) and, given the guide and data, ``draw_reconstruction.png``
    and, for a model with attention, ``draw_attention.png``; ``suffix`` goes before each extension (so that a
    partial evaluation or a ``sample`` call names its own files rather than replacing the evaluation's)."""
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    written = []
    if getattr(model, "context_shape", None) is None:
        generated = model.trajectory(num, device=device)
        written.append(step_grid(generated["canvas"], run_dir / f"draw_generation{suffix}.png"))
        written.append(generation_gif(generated["canvas"], run_dir / f"draw_generation{suffix}.gif"))
    if guide is not None and data is not None and getattr(model, "context_shape", None) is None:
        x = data[:num]
        recon = guide.trajectory(x)
        written.append(step_grid(recon["canvas"], run_dir / f"draw_reconstruction{suffix}.png"))
        if "read" in recon or "write" in recon:
            written.append(attention_figure(recon, run_dir / f"draw_attention{suffix}.png", data=x))
    return written


def _steps(total: int, most: int) -> list[int]:
    if total <= most:
        return list(range(total))
    return sorted({round(i * (total - 1) / (most - 1)) for i in range(most)})


def _displayable(image: torch.Tensor):
    image = image.clamp(0, 1)
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
