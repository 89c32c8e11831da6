"""Draw images/architecture.png: the ASEN architecture (Ma et al., AAAI 2020), with Pillow only.

    python images/draw_architecture.py [--out images/architecture.png]

Layout: input image and one-hot attribute a on the left; ResNet trunk -> feature map I -> ASA
-> ACA -> feature_fc -> L2 norm -> embedding along the main line; the attribute a feeds W1 (ASA)
and W2 (ACA) along a red line underneath; notes and a triplet-loss inset at the bottom. Uses
DejaVu Sans when the system has it (for Greek letters and operators) and otherwise Pillow's
default font with ASCII spellings.
"""
import argparse
import math
import os
import re

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 1600, 700
MAIN_Y = 240          # the main data line
ATTR_Y = 458          # the attribute line
BLACK, GREY, WHITE = (30, 30, 30), (110, 110, 110), (255, 255, 255)
RED = (192, 57, 43)
TRUNK = ((219, 232, 247), (59, 110, 165))     # (fill, outline)
ASA = ((253, 240, 222), (217, 130, 43))
ACA = ((226, 243, 226), (61, 139, 61))
OUT = ((238, 228, 246), (123, 79, 160))
NOTE = ((246, 246, 246), (160, 160, 160))

ASCII = {'α': 'alpha', '⊙': '*', '⊗': '*', 'Σ': 'sum', 'σ': 'sigmoid', '×': 'x', '·': '.',
         '∈': 'in', 'ℝ': 'R', '−': '-', '→': '->', '•': '-', '′': "'"}


class Fonts:
    """DejaVu Sans (regular, bold) at any size, or Pillow's default font with ASCII text."""

    def __init__(self):
        try:
            ImageFont.truetype('DejaVuSans.ttf', 10)
            ImageFont.truetype('DejaVuSans-Bold.ttf', 10)
            self.unicode = True
        except OSError:
            self.unicode = False
        self._cache = {}

    def get(self, size, bold=False):
        key = (round(size), bold)
        if key not in self._cache:
            if self.unicode:
                name = 'DejaVuSans-Bold.ttf' if bold else 'DejaVuSans.ttf'
                self._cache[key] = ImageFont.truetype(name, key[0])
            else:
                self._cache[key] = ImageFont.load_default(size=key[0])
        return self._cache[key]

    def text(self, s):
        if self.unicode:
            return s
        for symbol, spelled in ASCII.items():
            s = s.replace(symbol, spelled)
        return s


FONTS = Fonts()


# ----------------------------------------------------------------------------- text with sub/superscripts

def _segments(text, size):
    """'s_{an}' and 'ℝ^{d}' -> [(text, font size, baseline shift)]: a tiny rich-text format."""
    out = []
    for part in re.split(r'([_^]\{[^}]*\})', FONTS.text(text)):
        if not part:
            continue
        if part[0] in '_^' and part[1:2] == '{':
            out.append((part[2:-1], size * 0.7, size * 0.22 if part[0] == '_' else -size * 0.38))
        else:
            out.append((part, size, 0.0))
    return out


def text_width(draw, text, size=16, bold=False):
    return sum(draw.textlength(s, font=FONTS.get(z, bold)) for s, z, _ in _segments(text, size))


def write(draw, xy, text, size=16, bold=False, fill=BLACK, align='center'):
    """Draw one line of rich text; xy is its centre (align='center') or left end, mid-height."""
    x, y = xy
    if align == 'center':
        x -= text_width(draw, text, size, bold) / 2
    baseline = y + size * 0.36
    for s, z, shift in _segments(text, size):
        font = FONTS.get(z, bold)
        draw.text((x, baseline + shift), s, font=font, fill=fill, anchor='ls')
        x += draw.textlength(s, font=font)


def write_lines(draw, xy, lines, size=16, bold=False, fill=BLACK, align='center', spacing=1.35):
    """Several lines centred vertically on xy."""
    x, y = xy
    top = y - (len(lines) - 1) * size * spacing / 2
    for k, line in enumerate(lines):
        write(draw, (x, top + k * size * spacing), line, size, bold, fill, align)


# ----------------------------------------------------------------------------- shapes

def box(draw, xyxy, lines, colours, size=15, bold=False, radius=8, width=2):
    """A rounded box with centred text lines."""
    fill, outline = colours
    draw.rounded_rectangle(xyxy, radius=radius, fill=fill, outline=outline, width=width)
    cx, cy = (xyxy[0] + xyxy[2]) / 2, (xyxy[1] + xyxy[3]) / 2
    write_lines(draw, (cx, cy), lines, size, bold)


def container(draw, xyxy, title, subtitle, colours):
    """A dashed, lightly filled block frame with a title in its top-left corner."""
    fill, outline = colours
    light = tuple(int(255 - (255 - c) * 0.45) for c in fill)
    draw.rounded_rectangle(xyxy, radius=14, fill=light)
    x0, y0, x1, y1 = xyxy
    dash, gap = 12, 7
    for a, b, horizontal, at in ((x0 + 14, x1 - 14, True, y0), (x0 + 14, x1 - 14, True, y1),
                                 (y0 + 14, y1 - 14, False, x0), (y0 + 14, y1 - 14, False, x1)):
        p = a
        while p < b:
            q = min(p + dash, b)
            draw.line([(p, at), (q, at)] if horizontal else [(at, p), (at, q)], fill=outline, width=2)
            p = q + gap
    for cx, cy, start in ((x0 + 14, y0 + 14, 180), (x1 - 14, y0 + 14, 270),
                          (x1 - 14, y1 - 14, 0), (x0 + 14, y1 - 14, 90)):
        draw.arc([cx - 14, cy - 14, cx + 14, cy + 14], start, start + 90, fill=outline, width=2)
    write(draw, (x0 + 14, y0 + 20), title, 18, bold=True, fill=outline, align='left')
    write(draw, (x0 + 14 + text_width(draw, title, 18, True) + 10, y0 + 20), subtitle, 15,
          fill=outline, align='left')


def arrow(draw, points, fill=BLACK, width=2, head=9):
    """A polyline ending in a filled arrowhead."""
    draw.line(points, fill=fill, width=width, joint='curve')
    (x0, y0), (x1, y1) = points[-2], points[-1]
    length = max(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 1e-6)
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    bx, by = x1 - ux * head, y1 - uy * head
    draw.polygon([(x1, y1), (bx - uy * head * 0.55, by + ux * head * 0.55),
                  (bx + uy * head * 0.55, by - ux * head * 0.55)], fill=fill)


def dot(draw, xy, r=4, fill=BLACK):
    draw.ellipse([xy[0] - r, xy[1] - r, xy[0] + r, xy[1] + r], fill=fill)


def operator(draw, xy, symbol, r=14, colours=((255, 255, 255), BLACK)):
    """A circled operator such as ⊙ or Σ."""
    x, y = xy
    draw.ellipse([x - r, y - r, x + r, y + r], fill=colours[0], outline=colours[1], width=2)
    write(draw, (x, y - 1), symbol if FONTS.unicode else {'Σ': '+'}.get(symbol, symbol), 17, bold=True)


def cuboid(draw, xyxy, depth, colours, grid=None):
    """A 3-D block (front face xyxy, receding up-right by depth); optional grid on the front face."""
    fill, outline = colours
    x0, y0, x1, y1 = xyxy
    top = [(x0, y0), (x0 + depth, y0 - depth), (x1 + depth, y0 - depth), (x1, y0)]
    side = [(x1, y0), (x1 + depth, y0 - depth), (x1 + depth, y1 - depth), (x1, y1)]
    shade = tuple(max(0, c - 25) for c in fill)
    draw.polygon(top, fill=shade, outline=outline)
    draw.polygon(side, fill=tuple(max(0, c - 45) for c in fill), outline=outline)
    draw.rectangle(xyxy, fill=fill, outline=outline, width=2)
    if grid:
        for k in range(1, grid):
            x = x0 + (x1 - x0) * k / grid
            y = y0 + (y1 - y0) * k / grid
            draw.line([(x, y0), (x, y1)], fill=outline, width=1)
            draw.line([(x0, y), (x1, y)], fill=outline, width=1)


def heat_grid(draw, xy, cells=5, cell=9):
    """A small attention map: warm where the attribute (say, a collar) is."""
    x0, y0 = xy
    peak = (1.2, 2.0)
    for i in range(cells):
        for j in range(cells):
            v = max(0.0, 1.0 - ((i - peak[0]) ** 2 + (j - peak[1]) ** 2) / 5.0)
            colour = tuple(int(255 * min(1.0, max(0.0, 1.5 - abs(4 * v - c)))) for c in (3, 2, 1))  # jet
            draw.rectangle([x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell, y0 + (i + 1) * cell],
                           fill=colour, outline=WHITE)


def one_hot(draw, xy, n=6, hot=2, cell=18):
    """A row of n squares, square `hot` filled."""
    x0, y0 = xy
    for k in range(n):
        draw.rectangle([x0 + k * cell, y0, x0 + (k + 1) * cell, y0 + cell],
                       fill=RED if k == hot else WHITE, outline=BLACK, width=1)
        write(draw, (x0 + k * cell + cell / 2, y0 + cell / 2), '1' if k == hot else '0', 12,
              fill=WHITE if k == hot else GREY)


def garment(draw, xyxy, body=(70, 110, 170), background=(236, 230, 220)):
    """A picture frame holding a simple T-shirt, standing in for the input image."""
    x0, y0, x1, y1 = xyxy
    draw.rectangle(xyxy, fill=background, outline=BLACK, width=2)
    w, h = x1 - x0, y1 - y0
    pts = [(0.36, 0.16), (0.44, 0.2), (0.56, 0.2), (0.64, 0.16), (0.86, 0.3), (0.78, 0.44),
           (0.7, 0.4), (0.7, 0.86), (0.3, 0.86), (0.3, 0.4), (0.22, 0.44), (0.14, 0.3)]
    draw.polygon([(x0 + px * w, y0 + py * h) for px, py in pts], fill=body, outline=BLACK)
    draw.arc([x0 + 0.43 * w, y0 + 0.12 * h, x0 + 0.57 * w, y0 + 0.27 * h], 0, 180, fill=BLACK, width=2)


def embedding_bar(draw, xyxy, n=8, colours=OUT):
    """A vector drawn as a row of shaded cells."""
    x0, y0, x1, y1 = xyxy
    step = (x1 - x0) / n
    for k in range(n):
        t = (k * 37 % n) / n
        fill = tuple(int(c * (0.55 + 0.45 * t) + 255 * (0.45 - 0.45 * t)) for c in colours[1])
        draw.rectangle([x0 + k * step, y0, x0 + (k + 1) * step, y1], fill=fill, outline=colours[1])


# ----------------------------------------------------------------------------- the figure

def draw_inputs(draw):
    garment(draw, (35, 180, 150, 300))
    write_lines(draw, (92, 325), ['input image', '3 × S × S'], 15)
    write(draw, (92, 420), 'attribute a', 15)
    write(draw, (92, 438), '(one-hot)', 13, fill=GREY)
    one_hot(draw, (38, ATTR_Y - 9))
    arrow(draw, [(150, MAIN_Y), (183, MAIN_Y)])


def draw_trunk(draw):
    x0, x1 = 185, 320
    draw.rounded_rectangle([x0, 125, x1, 355], radius=10, fill=TRUNK[0], outline=TRUNK[1], width=2)
    write(draw, ((x0 + x1) / 2, 145), 'ResNet trunk', 16, bold=True, fill=TRUNK[1])
    layers = ['conv1 + pool', 'layer1', 'layer2', 'layer3']
    for k, name in enumerate(layers):
        y = 168 + k * 44
        box(draw, (x0 + 14, y, x1 - 14, y + 34), [name], (WHITE, TRUNK[1]), size=14, radius=5)
        if k:
            arrow(draw, [((x0 + x1) / 2, y - 10), ((x0 + x1) / 2, y)], head=6, width=1)
    write_lines(draw, ((x0 + x1) / 2, 380), ['cut after layer3', '(stride 16)'], 13, fill=GREY)
    arrow(draw, [(x1, MAIN_Y), (352, MAIN_Y)])


def draw_feature_map(draw):
    cuboid(draw, (356, 200, 410, 282), 18, TRUNK, grid=4)
    write(draw, (392, 310), 'I', 18, bold=True)
    write(draw, (392, 332), 'C × H × W', 14)
    write(draw, (392, 350), 'H = W = S/16', 12, fill=GREY)


def draw_asa(draw):
    x0, x1 = 455, 1022
    container(draw, (x0, 85, x1, 430), 'ASA', 'attribute-aware spatial attention', ASA)
    write_lines(draw, (x0 + 16, 148), [
        'p_{I} = tanh(conv_{1×1}(I)),   p_{a} = tanh(W_{1} a),   s = tanh(conv_{1×1}(p_{a} ⊙ p_{I}))',
        'α = softmax_{H×W}(s),   x = Σ_{h,w} α_{hw} I_{hw}   (a C-vector)'], 15, align='left')
    # main line: I straight through to the weighted sum
    sum_x, row_y = 975, 322
    arrow(draw, [(428, MAIN_Y), (sum_x - 15, MAIN_Y)])
    dot(draw, (478, MAIN_Y))
    arrow(draw, [(478, MAIN_Y), (478, row_y), (492, row_y)])
    box(draw, (494, row_y - 21, 604, row_y + 21), ['conv 1×1', 'tanh'], (WHITE, ASA[1]), size=13)
    arrow(draw, [(604, row_y), (646, row_y)])
    write(draw, (625, row_y - 13), 'p_{I}', 14)
    operator(draw, (660, row_y), '⊙')
    arrow(draw, [(674, row_y), (704, row_y)])
    box(draw, (706, row_y - 21, 806, row_y + 21), ['conv 1×1', 'tanh'], (WHITE, ASA[1]), size=13)
    arrow(draw, [(806, row_y), (842, row_y)])
    write(draw, (824, row_y - 12), 's', 14)
    box(draw, (844, row_y - 21, 934, row_y + 21), ['softmax', 'over H×W'], (WHITE, ASA[1]), size=13)
    # the attention map and its weighted sum
    arrow(draw, [(934, row_y), (950, row_y)])
    heat_grid(draw, (952, row_y - 22), cells=5, cell=9)
    write(draw, (974, row_y + 36), 'α', 16, bold=True)
    arrow(draw, [(sum_x, row_y - 23), (sum_x, MAIN_Y + 15)])
    operator(draw, (sum_x, MAIN_Y), 'Σ')
    write(draw, (sum_x - 46, MAIN_Y - 14), 'α·I', 13, fill=GREY)
    # the attribute branch
    box(draw, (606, 378, 714, 414), ['W_{1} a, tanh'], (WHITE, ASA[1]), size=13)
    arrow(draw, [(660, 378), (660, row_y + 15)])
    write(draw, (676, 356), 'p_{a}', 14, align='left')


def draw_aca(draw):
    x0, x1 = 1042, 1400
    container(draw, (x0, 85, x1, 430), 'ACA', 'attribute-aware channel attention', ACA)
    write_lines(draw, (x0 + 16, 148), [
        'q = ReLU(W_{2} a)',
        'm = σ(fc_{2}(ReLU(fc_{1}([x; q]))))',
        'output  x ⊙ m'], 15, align='left')
    prod_x, row_y = 1330, 322
    arrow(draw, [(989, MAIN_Y), (prod_x - 15, MAIN_Y)])
    write(draw, (1032, MAIN_Y - 14), 'x', 15, bold=True)
    dot(draw, (1072, MAIN_Y))
    arrow(draw, [(1072, MAIN_Y), (1072, row_y - 21)])
    box(draw, (1052, row_y - 21, 1122, row_y + 21), ['[x; q]'], (WHITE, ACA[1]), size=14)
    arrow(draw, [(1122, row_y), (1140, row_y)])
    box(draw, (1142, row_y - 21, 1222, row_y + 21), ['fc_{1}', 'ReLU'], (WHITE, ACA[1]), size=13)
    arrow(draw, [(1222, row_y), (1240, row_y)])
    box(draw, (1242, row_y - 21, 1316, row_y + 21), ['fc_{2}', 'σ'], (WHITE, ACA[1]), size=13)
    arrow(draw, [(1316, row_y), (prod_x, row_y), (prod_x, MAIN_Y + 15)])
    write(draw, (prod_x + 10, 282), 'm', 15, bold=True, align='left')
    operator(draw, (prod_x, MAIN_Y), '⊙')
    # the attribute branch
    box(draw, (1050, 378, 1144, 414), ['W_{2} a, ReLU'], (WHITE, ACA[1]), size=13)
    arrow(draw, [(1087, 378), (1087, row_y + 21)])
    write(draw, (1094, 360), 'q', 14, align='left')


def draw_output(draw):
    cx = 1500
    arrow(draw, [(1344, MAIN_Y), (1418, MAIN_Y)])
    write(draw, (1380, MAIN_Y - 14), 'C', 13, fill=GREY)
    box(draw, (1420, MAIN_Y - 24, 1580, MAIN_Y + 24), ['feature_fc', 'C → d'], OUT, size=14)
    arrow(draw, [(cx, MAIN_Y + 24), (cx, MAIN_Y + 52)])
    box(draw, (1420, MAIN_Y + 54, 1580, MAIN_Y + 94), ['L2 normalise'], OUT, size=14)
    arrow(draw, [(cx, MAIN_Y + 94), (cx, MAIN_Y + 122)])
    embedding_bar(draw, (1430, MAIN_Y + 126, 1570, MAIN_Y + 146))
    write_lines(draw, (cx, MAIN_Y + 182), ['attribute-specific', 'embedding', 'f(I, a) ∈ ℝ^{d}'], 14,
                bold=True, fill=OUT[1])


def draw_attribute_line(draw):
    x_end = 1087
    draw.line([(146, ATTR_Y), (x_end, ATTR_Y)], fill=RED, width=3)
    arrow(draw, [(660, ATTR_Y), (660, 416)], fill=RED, width=3)
    arrow(draw, [(x_end, ATTR_Y), (x_end, 416)], fill=RED, width=3)
    dot(draw, (660, ATTR_Y), 5, RED)
    write(draw, (400, ATTR_Y - 13), 'a conditions both attention blocks', 14, fill=RED)


def draw_notes(draw):
    x0, y0, x1, y1 = 30, 482, 1010, 690
    draw.rounded_rectangle((x0, y0, x1, y1), radius=10, fill=NOTE[0], outline=NOTE[1], width=1)
    write(draw, (x0 + 16, y0 + 22), 'Shapes and notes', 15, bold=True, align='left')
    write_lines(draw, (x0 + 16, y0 + 112), [
        '• Input: Resize(S) + CenterCrop(S); I = layer3 output, C = 1024 for ResNet-50',
        '  (256 for ResNet-18/34), H = W = S/16, e.g. 14 × 14 at S = 224.',
        '• α (H × W, sums to 1) is where the network looks for attribute a; visualize.py',
        '  overlays it on the cropped image.  ASA and ACA use 512 hidden units.',
        '• Ablations: no ASA = global average pooling of I;  no ACA = skip the mask m.',
        '• Retrieval: rank the candidates by f(I, a) · f(I′, a) under the query\'s attribute a.',
    ], 15, align='left', spacing=1.55)


def draw_triplet_inset(draw):
    x0, y0, x1, y1 = 1040, 482, 1585, 690
    draw.rounded_rectangle((x0, y0, x1, y1), radius=10, fill=WHITE, outline=GREY, width=2)
    write(draw, (x0 + 16, y0 + 20), 'Training: triplet ranking loss', 15, bold=True, align='left')
    names = [('anchor', 'A'), ('positive', 'P'), ('negative', 'N')]
    for k, (name, short) in enumerate(names):
        y = y0 + 56 + k * 38
        box(draw, (x0 + 14, y - 14, x0 + 94, y + 14), [name], (WHITE, BLACK), size=13, radius=5, width=1)
        arrow(draw, [(x0 + 94, y), (x0 + 124, y)], width=1, head=7)
        arrow(draw, [(x0 + 226, y), (x0 + 254, y)], width=1, head=7)
        write(draw, (x0 + 276, y), f'f_{{{short}}}', 15, bold=True)
    box(draw, (x0 + 126, y0 + 38, x0 + 226, y0 + 150), ['ASEN', 'shared,', 'same a'], OUT, size=13)
    # unit-sphere sketch: P pulled towards A, N pushed away
    cx, cy, r = x0 + 420, y0 + 175, 115
    draw.arc([cx - r, cy - r, cx + r, cy + r], 210, 330, fill=GREY, width=2)
    pts = {}
    for name, angle in (('A', 262), ('P', 236), ('N', 316)):
        px, py = cx + r * math.cos(math.radians(angle)), cy + r * math.sin(math.radians(angle))
        pts[name] = (px, py)
        dot(draw, (px, py), 5, {'A': BLACK, 'P': ACA[1], 'N': RED}[name])
        write(draw, (px + (-16 if name == 'P' else 16), py - 12), f'f_{{{name}}}', 14)
    draw.line([pts['A'], pts['P']], fill=ACA[1], width=2)
    draw.line([pts['A'], pts['N']], fill=RED, width=2)
    for other, label, colour, (dx, dy) in (('N', 's_{an}', RED, (4, 16)), ('P', 's_{ap}', ACA[1], (6, 18))):
        mid_x, mid_y = (pts['A'][0] + pts[other][0]) / 2, (pts['A'][1] + pts[other][1]) / 2
        write(draw, (mid_x + dx, mid_y + dy), label, 13, fill=colour)
    write(draw, ((x0 + x1) / 2, y1 - 40),
          's_{ap} = f_{A} · f_{P},   s_{an} = f_{A} · f_{N}   (unit vectors: cosine)', 14)
    write(draw, ((x0 + x1) / 2, y1 - 16), 'L = max(0, s_{an} − s_{ap} + margin)', 16, bold=True)


def draw_figure():
    image = Image.new('RGB', (WIDTH, HEIGHT), WHITE)
    draw = ImageDraw.Draw(image)
    write(draw, (WIDTH / 2, 32), 'ASEN: Attribute-Specific Embedding Network  (Ma et al., AAAI 2020)', 22,
          bold=True)
    draw_asa(draw)
    draw_aca(draw)
    draw_inputs(draw)
    draw_trunk(draw)
    draw_feature_map(draw)
    draw_output(draw)
    draw_attribute_line(draw)
    draw_notes(draw)
    draw_triplet_inset(draw)
    return image


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=os.path.join(here, 'architecture.png'), help='PNG to write')
    args = parser.parse_args()
    image = draw_figure()
    image = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(args.out, optimize=True)
    print(f'wrote {args.out} ({os.path.getsize(args.out) // 1024} KB)')


if __name__ == '__main__':
    main()
