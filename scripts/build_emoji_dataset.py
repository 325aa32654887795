"""Regenerate the shipped ``emoji32`` dataset from the Noto Color Emoji font.

Every single-code-point emoji in the font's character map is rendered on white at the font's only
bitmap size (109 px, the size Pillow can draw the CBDT colour glyphs at), cropped to a square,
downsampled with LANCZOS and stored with its lower-case Unicode name as caption.

    python scripts/build_emoji_dataset.py --size 32 --out stepdistill/data/assets/emoji32.npz

Needs Debian's ``fonts-noto-color-emoji`` (SIL Open Font License 1.1) and ``fonttools``.
"""
from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NATIVE_SIZE = 109  # CBDT bitmap strike; any other size fails to render in Pillow
CANVAS = 136


def emoji_codepoints(font_path: str) -> list[tuple[int, str]]:
    """Code points the font maps that Unicode names and that draw as pictographs (not ASCII, not tags)."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(font_path).getBestCmap()
    found = []
    for cp in sorted(cmap):
        if cp < 0x80 or 0xE0000 <= cp <= 0xE007F or 0xFE00 <= cp <= 0xFE0F or 0x1F3FB <= cp <= 0x1F3FF:
            continue  # ASCII digits/#/*, tag characters, variation selectors and skin-tone modifiers
        name = unicodedata.name(chr(cp), "")
        if name:
            found.append((cp, name.lower()))
    return found


def render(font: ImageFont.FreeTypeFont, cp: int, size: int) -> np.ndarray | None:
    """Draw one glyph on white, crop to its square bounding box, resize to ``size``; None if blank."""
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((CANVAS // 2, CANVAS // 2), chr(cp), font=font, anchor="mm", embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    side = max(right - left, bottom - top)
    cx, cy = (left + right) // 2, (top + bottom) // 2
    square = canvas.crop((cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, square).convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.LANCZOS), dtype=np.uint8)


def build(font_path: str, size: int) -> tuple[np.ndarray, list[str], list[int]]:
    """Render every emoji of the font; returns (images N x size x size x 3 uint8, captions, code points)."""
    font = ImageFont.truetype(font_path, NATIVE_SIZE)
    images, captions, cps = [], [], []
    for cp, name in emoji_codepoints(font_path):
        image = render(font, cp, size)
        if image is not None and image.min() < 250:  # skip glyphs that render as (almost) nothing
            images.append(image)
            captions.append(name)
            cps.append(cp)
    return np.stack(images), captions, cps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--font", default=DEFAULT_FONT, help="path to NotoColorEmoji.ttf")
    parser.add_argument("--size", type=int, default=32, help="output side length in pixels")
    parser.add_argument("--out", default="stepdistill/data/assets/emoji32.npz", help="output .npz file")
    args = parser.parse_args(argv)
    if not Path(args.font).is_file():
        print(f"error: font file {args.font!r} not found; install Debian's fonts-noto-color-emoji or pass --font", file=sys.stderr)
        return 2
    if not 8 <= args.size <= 109:
        print(f"error: --size {args.size} is out of range; allowed 8..109", file=sys.stderr)
        return 2
    images, captions, cps = build(args.font, args.size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=images, captions=np.array(captions), codepoints=np.array(cps, dtype=np.int32))
    tmp.replace(out)
    print(f"wrote {len(captions)} images of {args.size}x{args.size} to {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
