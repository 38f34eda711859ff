"""PNG charts with the standard library only (zlib for the image data): bars and lines
on a white canvas with axes and light grid lines. Titles and numbers go in the HTML
around them. Used by the examples' reports."""

import struct
import zlib

WHITE, AXIS, GRID = (255, 255, 255), (60, 70, 80), (225, 230, 236)
BLUE, ORANGE, RED = (31, 111, 235), (230, 126, 34), (198, 40, 40)


class Canvas:
    def __init__(self, width=640, height=240, pad=24):
        self.w, self.h, self.pad = width, height, pad
        self.px = bytearray(WHITE * (width * height))

    def dot(self, x, y, color):
        x, y = int(round(x)), int(round(y))
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(color)

    def line(self, x0, y0, x1, y1, color):
        steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for s in range(steps + 1):
            self.dot(x0 + (x1 - x0) * s / steps, y0 + (y1 - y0) * s / steps, color)

    def rect(self, x0, y0, x1, y1, color):
        for y in range(int(min(y0, y1)), int(max(y0, y1)) + 1):
            self.line(x0, y, x1, y, color)

    def frame(self):
        """Grid lines at quarters and the two axes; returns the plot area (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = self.pad, self.pad, self.w - self.pad, self.h - self.pad
        for q in (0.25, 0.5, 0.75, 1.0):
            y = y1 - (y1 - y0) * q
            self.line(x0, y, x1, y, GRID)
        self.line(x0, y1, x1, y1, AXIS)
        self.line(x0, y0, x0, y1, AXIS)
        return x0, y0, x1, y1

    def png(self):
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def bars(values, path, color=BLUE, top=None):
    """One bar per value (a histogram, or one per sensor); the highest reaches the top
    (or `top`). Returns the scale's top."""
    c = Canvas()
    x0, y0, x1, y1 = c.frame()
    top = top or max(max(values, default=0), 1)
    width = (x1 - x0) / max(len(values), 1)
    for i, v in enumerate(values):
        h = (y1 - y0) * min(v, top) / top
        c.rect(x0 + i * width + 1, y1 - h, x0 + (i + 1) * width - 1, y1 - 1, color)
    with open(path, "wb") as f:
        f.write(c.png())
    return top


def lines(series, path, top=None):
    """Lines of `(color, [y, ...])` over the same x steps. Returns the scale's top."""
    c = Canvas()
    x0, y0, x1, y1 = c.frame()
    top = top or max([max(ys, default=0) for _, ys in series] + [1])
    for color, ys in series:
        step = (x1 - x0) / max(len(ys) - 1, 1)
        points = [(x0 + i * step, y1 - (y1 - y0) * min(y, top) / top) for i, y in enumerate(ys)]
        for (a, b), (p, q) in zip(points, points[1:]):
            c.line(a, b, p, q, color)
    with open(path, "wb") as f:
        f.write(c.png())
    return top
