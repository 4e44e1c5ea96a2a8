"""The drawing code of the paper's figures (paper/figures.py: Figs. 3b, 4, 5, 6, 9, 12 and the training curves) and of
benchmarks/reproduce.py, with PIL (it ships with torchvision: no new dependency). Four kinds of plot: lines (a log
y-axis on request), scatter, heat maps with named rows and columns, and tiles of images with captions. Each returns a
PIL image; panels() sets several under one title; save() writes atomically. Kept apart so that the figures read as
what they show, not as pixel arithmetic."""
import math

import torch
from PIL import Image, ImageDraw, ImageFont

import simlap

FONT = ImageFont.load_default()
INK, GRID = (0, 0, 0), (225, 225, 225)
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (0, 0, 0), (100, 100, 255))
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))  # low -> high


def colormap(t):
    """Values in [0, 1], any shape -> uint8 RGB (..., 3): viridis, linear between its 5 anchors."""
    anchors = torch.tensor(VIRIDIS, dtype=torch.float32)
    x = t.float().nan_to_num(0).clamp(0, 1) * (len(VIRIDIS) - 1)
    i = x.floor().long().clamp_max(len(VIRIDIS) - 2)
    f = (x - i)[..., None]
    return (anchors[i] * (1 - f) + anchors[i + 1] * f).round().to(torch.uint8)


def to_image(rgb):
    """uint8 (3, H, W) or (H, W, 3) tensor -> PIL image."""
    rgb = rgb.permute(1, 2, 0) if rgb.shape[0] == 3 and rgb.shape[-1] != 3 else rgb
    return Image.fromarray(rgb.contiguous().numpy(), "RGB")


def ticks(lo, hi, n=5):
    """About n round values (1, 2 or 5 times a power of ten apart) in [lo, hi]."""
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def vertical_text(img, xy, text):
    """text rotated by 90 degrees (read bottom to top), its top-left corner at xy."""
    w, h = int(FONT.getlength(text)) + 2, 14
    tile = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(tile).text((0, 0), text, fill=INK, font=FONT)
    img.paste(tile.rotate(90, expand=True), xy)


class Axes:
    """A white image with a plot box, ticks, axis labels, a title and `legend` pixels of room on the right.
    px(x), py(y) map data to pixels; with ylog, y is drawn on a log10 scale."""

    def __init__(self, xlim, ylim, title, xlabel="", ylabel="", ylog=False, size=(440, 300), legend=0):
        self.img = Image.new("RGB", size, "white")
        self.d, self.ylog = ImageDraw.Draw(self.img), ylog
        self.box = x0, y0, x1, y1 = 58, 22, size[0] - 10 - legend, size[1] - 36  # left, top, right, bottom
        pad = lambda lo, hi: (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo, hi)  # noqa: E731
        self.xlim = pad(*xlim)
        self.ylim = pad(*((math.log10(v) for v in ylim) if ylog else ylim))
        for v in ticks(*self.ylim) if not ylog else range(math.ceil(self.ylim[0]), math.floor(self.ylim[1]) + 1):
            y = self.py(10 ** v if ylog else v)
            self.d.line([(x0, y), (x1, y)], fill=GRID)
            text = f"1e{v}" if ylog else f"{v:g}"
            self.d.text((x0 - 4 - FONT.getlength(text), y - 6), text, fill=INK, font=FONT)
        for v in ticks(*self.xlim):
            self.d.line([(self.px(v), y1), (self.px(v), y1 + 3)], fill=INK)
            self.d.text((self.px(v) - FONT.getlength(f"{v:g}") / 2, y1 + 5), f"{v:g}", fill=INK, font=FONT)
        self.d.rectangle([x0, y0, x1, y1], outline=INK)
        self.d.text((x0, 4), title, fill=INK, font=FONT)
        self.d.text(((x0 + x1 - FONT.getlength(xlabel)) / 2, size[1] - 15), xlabel, fill=INK, font=FONT)
        vertical_text(self.img, (2, int((y0 + y1 - FONT.getlength(ylabel)) / 2)), ylabel)

    def px(self, x):
        x0, _, x1, _ = self.box
        return x0 + (x1 - x0) * (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])

    def py(self, y):
        _, y0, _, y1 = self.box
        y = math.log10(y) if self.ylog else y
        return y1 + (y0 - y1) * (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])

    def legend(self, names, colours, markers=None):
        """One entry per name, right of the box: a short line, or with markers a dot ("o") or square ("s")."""
        for i, (name, colour) in enumerate(zip(names, colours)):
            x, y = self.box[2] + 10, self.box[1] + 4 + 15 * i
            if markers:
                dot(self.d, x + 9, y + 6, 4, colour, markers[i])
            else:
                self.d.line([(x, y + 6), (x + 18, y + 6)], fill=colour, width=3)
            self.d.text((x + 24, y), name, fill=INK, font=FONT)


def dot(d, x, y, r, colour, marker="o", outline=None):
    box = [x - r, y - r, x + r, y + r]
    (d.ellipse if marker == "o" else d.rectangle)(box, fill=colour, outline=outline)


def lines(series, title, xlabel, ylabel, ylog=False, ylim=None, size=(440, 300)):
    """series: [(name, xs, ys)] -> one line each, in PALETTE order, and a legend when there are several."""
    series = [(n, [x for x, y in zip(xs, ys) if y > 0 or not ylog], [y for y in ys if y > 0 or not ylog])
              for n, xs, ys in series]
    series = [s for s in series if s[1]]
    xs, ys = [x for s in series for x in s[1]] or [0], [y for s in series for y in s[2]] or [1]
    room = int(max(FONT.getlength(n) for n, _, _ in series) + 40) if len(series) > 1 else 0
    size = (size[0] + room, size[1])  # the legend gets its own room: the plot keeps its width
    ax = Axes((min(xs), max(xs)), ylim or (min(ys), max(ys)), title, xlabel, ylabel, ylog, size, room)
    for i, (_, x, y) in enumerate(series):
        ax.d.line([(ax.px(a), ax.py(b)) for a, b in zip(x, y)], fill=PALETTE[i % len(PALETTE)], width=2)
    if room:
        ax.legend([n for n, _, _ in series], PALETTE)
    return ax.img


def scatter(xy, labels, names, title, squares=(), size=(380, 380)):
    """xy (N, 2) points coloured by their class (labels (N,), names[k] in the legend); classes in `squares` drawn as
    squares, the others as dots; each class centre as a large marker outlined in black."""
    present = sorted(set(labels.tolist()))
    room = int(max(FONT.getlength(names[k]) for k in present) + 40)
    size = (size[0] + room, size[1])
    lo, hi = xy.min(0).values, xy.max(0).values
    lo, hi = (lo - 0.04 * (hi - lo)).tolist(), (hi + 0.04 * (hi - lo)).tolist()  # no point on the frame
    ax = Axes((lo[0], hi[0]), (lo[1], hi[1]), title, "t-SNE 1", "t-SNE 2", size=size, legend=room)
    colour = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(present)}
    marker = {k: "s" if k in squares else "o" for k in present}
    for (x, y), k in zip(xy.tolist(), labels.tolist()):
        dot(ax.d, ax.px(x), ax.py(y), 2, colour[k], marker[k])
    for k in present:
        cx, cy = xy[labels == k].mean(0).tolist()
        dot(ax.d, ax.px(cx), ax.py(cy), 7, colour[k], marker[k], outline=INK)
    ax.legend([names[k] for k in present], [colour[k] for k in present], [marker[k] for k in present])
    return ax.img


def heatmap(m, title, rows=None, cols=None, lo=None, hi=None, cell=(14, 14), xlabel="", ylabel=""):
    """m (R, C) as cells of colormap((v - lo) / (hi - lo)) (default: m's own range), row names on the left and
    column names on top (when given), a colour bar from lo to hi underneath."""
    m = m.float()
    lo, hi = m.min().item() if lo is None else lo, m.max().item() if hi is None else hi
    left = int(max([FONT.getlength(r) for r in rows or []] + [0]) + 20)
    top = 22 + int(max([FONT.getlength(c) for c in cols or []] + [0]) + 4)
    cw, ch = cell
    W, H = left + cw * m.shape[1] + 36, top + ch * m.shape[0] + 44  # room for the colour bar's labels
    img = Image.new("RGB", (max(W, int(FONT.getlength(title)) + 10, left + 150), H), "white")
    d = ImageDraw.Draw(img)
    img.paste(to_image(colormap((m - lo) / max(hi - lo, 1e-12))).resize((cw * m.shape[1], ch * m.shape[0]),
                                                                           Image.NEAREST), (left, top))
    d.text((4, 4), title, fill=INK, font=FONT)
    for i, r in enumerate(rows or []):
        d.text((left - 4 - FONT.getlength(r), top + ch * i + ch / 2 - 6), r, fill=INK, font=FONT)
    for j, c in enumerate(cols or []):
        vertical_text(img, (left + cw * j + (cw - 14) // 2, 24), c)
    if ylabel:
        vertical_text(img, (2, int(top + (ch * m.shape[0] - FONT.getlength(ylabel)) / 2)), ylabel)
    bar_y = top + ch * m.shape[0] + 8
    d.text((left, bar_y + 14), xlabel, fill=INK, font=FONT)
    bar = colormap(torch.linspace(0, 1, 100))[None].expand(8, 100, 3)
    x_bar = max(W - 136, left + 30)
    img.paste(to_image(bar), (x_bar, bar_y))
    d.text((x_bar - 4 - FONT.getlength(f"{lo:.2g}"), bar_y - 3), f"{lo:.2g}", fill=INK, font=FONT)
    d.text((x_bar + 104, bar_y - 3), f"{hi:.2g}", fill=INK, font=FONT)
    return img


def overlay(image, heat, alpha=0.55):
    """A uint8 image (3, H, W) with a heat map (H, W) in [0, 1] blended over it in colormap colours."""
    return (image.float() * (1 - alpha) + colormap(heat).permute(2, 0, 1).float() * alpha).round().to(torch.uint8)


def tiles(rows, header=(), scale=3, caption_lines=2):
    """rows: lists of (uint8 image (3, h, w), caption) -> a grid, images scaled `scale` times (nearest), captions
    ('\\n' breaks lines) below them, column titles `header` above."""
    h, w = (scale * s for s in rows[0][0][0].shape[1:])
    cw = max(w, *(int(FONT.getlength(line)) + 6 for row in rows for _, c in row for line in c.split("\n")))
    rh, top = h + 14 * caption_lines + 6, 18 if header else 4
    img = Image.new("RGB", (cw * max(len(r) for r in rows) + 4, top + rh * len(rows)), "white")
    d = ImageDraw.Draw(img)
    for j, text in enumerate(header):
        d.text((4 + cw * j, 3), text, fill=INK, font=FONT)
    for i, row in enumerate(rows):
        for j, (image, caption) in enumerate(row):
            img.paste(to_image(image).resize((w, h), Image.NEAREST), (4 + cw * j, top + rh * i))
            d.multiline_text((4 + cw * j, top + rh * i + h + 2), caption, fill=INK, font=FONT, spacing=3)
    return img


def panels(images, title="", columns=None):
    """Images in a grid of `columns` (default: one row), tops aligned, under a title."""
    columns = columns or len(images)
    rows = [images[i:i + columns] for i in range(0, len(images), columns)]
    widths = [sum(im.width for im in row) + 8 * (len(row) - 1) for row in rows]
    heights = [max(im.height for im in row) for row in rows]
    top = 22 if title else 0
    img = Image.new("RGB", (max(widths + [int(FONT.getlength(title)) + 10]), top + sum(heights) + 8 * (len(rows) - 1)),
                    "white")
    ImageDraw.Draw(img).text((6, 5), title, fill=INK, font=FONT)
    y = top
    for row, height in zip(rows, heights):
        x = 0
        for im in row:
            img.paste(im, (x, y))
            x += im.width + 8
        y += height + 8
    return img


def save(img, path):
    """The image as a PNG at path, written atomically -> path. One with more than 256 colours (photos under heat
    maps) is stored with a 256-colour palette of its own: a third of the bytes, at the cost of merging close shades."""
    if img.getcolors(256) is None:
        img = img.quantize(256)
    simlap.save_atomic(img, path, save=lambda im, f: im.save(f, format="PNG", optimize=True))
    return path
