"""The toy world: a small, procedural, fully labelled image world to pretrain and test on.

Real personalization research needs a pretrained Stable Diffusion, LAION, and DreamBench. This file
replaces all three with something a CPU can hold: captioned 64x64 pictures of coloured shapes on
textured backgrounds, where every attribute is known, so a toy SD can be pretrained on them and
personalization can be *measured* instead of eyeballed.

The world
---------
A scene is one or two objects on a background. An object has a shape, a primary colour, a pattern
(plain / striped / dotted / checkered) with a secondary colour, a size (small / medium / large) and
a position on a 3x3 grid. Objects never overlap; in a two-object scene the first ("main") object
is always of a strictly larger size class, so "the main object" is well defined from pixels alone.
Colours that would vanish into a background (green on grass, white on snow, ...) never meet it
(CLASHES). Images are drawn at 4x supersampling and box-filtered down, so a 15-pixel star is still
a star. Every scene is a frozen dataclass; sampling is deterministic in (seed, index), and
rendering is deterministic in the scene.

Captions come from a few templates ("a small red and white striped star on the snow, in the top
left", "a blue circle next to a large yellow dotted heart on the grass"); size and position are
sometimes left out, as real captions leave things out, and now and then the noun is the generic
"toy" so that the word has a meaning for concepts whose shape the model never saw.

Held out from pretraining (`sample_scene(world="pretrain")` never produces them):
  - the shapes in HELD_OUT_SHAPES, entirely;
  - the exact (shape, colour, pattern, secondary colour) of every CONCEPT.
Each of the 8 CONCEPTS has a class word (its shape, or "toy" for a held-out shape), reference
images (`make-concepts`) and eval prompts. The probes are evaluators, not the model under test, so
they train on world="probe", which has everything.

Record format (Subject-Diffusion, `make-records`)
--------------------------------------------------
One sample = three files sharing a key (`000123`), either loose in a folder or as members of
webdataset-style tar shards `00000.tar, 00001.tar, ...`:
  - `{key}.png`       the RGB image;
  - `{key}.mask.png`  a palettised label map: 0 = background, k = object k (value of objects[k-1]);
  - `{key}.json`      {"caption": str, "background": str, "width": int, "height": int,
                       "objects": [{"value": k, "label": the entity word as it appears in the
                       caption ("star", or "toy"), "box": [x1, y1, x2, y2] in pixels with x2, y2
                       exclusive, "attributes": {shape, color, pattern, color2, size, position}}]}.
This is the original labeller's json ({caption, mask: [{value, label, box}]}, see
methods/subject_diffusion.md 7.4) with the SAM/GroundingDINO guesses replaced by ground truth.
`read_records(path)` reads either form back.

Benchmark (`eval`)
------------------
Every concept carries eval prompts with a `{}` where the method puts its concept phrase ("a {} on
the snow" -> "a sks toy on the snow") and a machine-readable `asks` dict of what the prompt
requests: background / position / size / color / pattern / color2 / other_object {shape, color}.
The prompts cover a new scene (3 backgrounds never used in the references), a new position, a new
size, a new colour, a new pattern, and a second object ("next to a small blue circle").
A folder of generated images with a `manifest.jsonl` ({"file", "concept", "prompt" (id, template,
or the filled-in text), "method"} per line) is scored with small CNN probes (assets/toy/
probes.safetensors) that read the background, and the main (largest) object's position, size,
shape, color, pattern and color2, and the other object's shape and color (or "none"):
  - concept fidelity = mean agreement of the predicted shape, color, pattern and color2 with the
    concept, leaving out those the prompt itself changes ("a {} in green" drops color);
  - prompt fidelity  = mean agreement with everything the prompt asks.
Both are averaged per image, then per method, per method x concept, per method x concept x prompt.
`make-oracle` renders ground truth for every prompt: the ceiling of the benchmark. With the toy
model present, `eval` also reports CLIP-T (image vs the prompt with the class word) and CLIP-I
(image vs the concept's references) in the toy CLIP's embedding space (`ToyCLIP`).

    python toy_world.py make-data --out data/toy --n 100000 --seed 0   # ~4 ms an image, 1 core
    python toy_world.py make-records --out data/records --n 20000 --shard-size 1000
    python toy_world.py make-concepts --out data/concepts
    python toy_world.py train-probes      # writes assets/toy/probes.safetensors, ~11 min, 1 core
    python toy_world.py make-oracle --out outputs/oracle && \
        python toy_world.py eval --images outputs/oracle   # ~0.97 / 0.99: the ceiling
"""

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

import sd_model as sdm

# ----------------------------------------------------------------------------------------------
# 1. Vocabulary

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "hexagon", "moon")
HELD_OUT_SHAPES = ("arrow", "bolt", "flower")  # only concepts have them; the probes know them too
ALL_SHAPES = SHAPES + HELD_OUT_SHAPES
COLORS = {
    "red": (220, 35, 35), "orange": (245, 135, 20), "yellow": (250, 220, 40),
    "green": (40, 165, 60), "blue": (35, 80, 220), "purple": (130, 50, 180),
    "pink": (250, 135, 195), "white": (245, 245, 245), "black": (25, 25, 25),
    "brown": (120, 70, 30),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
SIZES = {"small": 0.12, "medium": 0.18, "large": 0.26}  # object radius as a fraction of the side
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # row-major 3x3 grid
POS_PHRASE = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
              "left": "on the left", "center": "in the center", "right": "on the right",
              "bottom left": "in the bottom left", "bottom": "at the bottom",
              "bottom right": "in the bottom right"}
BACKGROUNDS = ("sky", "grass", "sand", "snow", "water", "brick", "wood", "night")
BG_PHRASE = {"sky": "in the sky", "grass": "on the grass", "sand": "on the sand",
             "snow": "in the snow", "water": "on the water", "brick": "against a brick wall",
             "wood": "on wood", "night": "at night"}
# Primary colours too close to a background to be seen on it (white clouds count for the sky).
CLASHES = {"sky": {"white"}, "grass": {"green"}, "sand": {"yellow"}, "snow": {"white"},
           "water": {"blue"}, "brick": {"red", "brown"}, "wood": {"brown"}, "night": {"black"}}
IDENTITY = ("shape", "color", "pattern", "color2")  # what makes a concept that concept
GENERIC_NOUN = "toy"   # the caption noun for "some object"; class word of held-out-shape concepts
MARGIN, JITTER, OUTLINE = 0.02, 0.03, 0.016  # fractions of the image side
SUPERSAMPLE = 4
PROBES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy",
                           "probes.safetensors")


@functools.lru_cache(maxsize=None)
def contrasting(color):
    """Secondary colours that stay visible against `color` (RGB distance > 120)."""
    c = np.array(COLORS[color])
    return tuple(n for n, v in COLORS.items() if np.linalg.norm(c - np.array(v)) > 120)


# ----------------------------------------------------------------------------------------------
# 2. Scenes: frozen specs, sampling, captions

@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    pattern: str = "plain"
    color2: str = "none"      # "none" exactly when the pattern is plain
    size: str = "medium"
    position: str = "center"
    cx: float = 0.5           # placement as fractions of the side, so a scene renders alike at
    cy: float = 0.5           # every resolution
    r: float = 0.18

    def key(self):
        return (self.shape, self.color, self.pattern, self.color2)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple            # main (largest) object first
    texture_seed: int = 0


@dataclass(frozen=True)
class Concept:
    id: str
    class_word: str           # the noun a user would type: the shape, or "toy" for a new shape
    shape: str
    color: str
    pattern: str = "plain"
    color2: str = "none"
    folder: str = field(default="", compare=False)  # the make-concepts folder it was read from, whose references CLIP-I uses

    def key(self):
        return (self.shape, self.color, self.pattern, self.color2)

    def attributes(self):
        return dict(zip(IDENTITY, self.key()))

    def init_word(self):
        """The one CLIP token a learned token starts from (TI, ViCo, DCO): the class word, or the generic
        noun when the class word is several tokens ("hexagon" = hex + agon, pieces no caption has alone)."""
        return self.class_word if len(sdm.CLIPTokenizer().tokenize(self.class_word)) == 1 else GENERIC_NOUN


CONCEPTS = (
    Concept("candy_star", "star", "star", "red", "striped", "white"),
    Concept("polka_heart", "heart", "heart", "pink", "dotted", "white"),
    Concept("checker_diamond", "diamond", "diamond", "blue", "checkered", "yellow"),
    Concept("stripy_moon", "moon", "moon", "green", "striped", "black"),
    Concept("speckled_hexagon", "hexagon", "hexagon", "orange", "dotted", "purple"),
    Concept("orange_arrow", GENERIC_NOUN, "arrow", "orange"),
    Concept("hazard_bolt", GENERIC_NOUN, "bolt", "yellow", "striped", "black"),
    Concept("berry_flower", GENERIC_NOUN, "flower", "purple", "dotted", "pink"),
)
CONCEPT_KEYS = frozenset(c.key() for c in CONCEPTS)


def _pick(rng, seq):
    seq = tuple(seq)
    return seq[int(rng.integers(len(seq)))]


def place(rng, size, position):
    """Centre and radius for a size class in a grid cell, kept inside the image."""
    r = SIZES[size] * rng.uniform(0.92, 1.08)
    row, col = divmod(POSITIONS.index(position), 3)
    lo, hi = MARGIN + r, 1 - MARGIN - r
    cx = np.clip(lo + (hi - lo) * col / 2 + rng.uniform(-JITTER, JITTER), lo, hi)
    cy = np.clip(lo + (hi - lo) * row / 2 + rng.uniform(-JITTER, JITTER), lo, hi)
    return float(cx), float(cy), float(r)


def _overlap(a, b, gap=0.02):
    # every shape fits in the square [cx - r, cx + r]^2, so disjoint squares never touch
    return abs(a.cx - b.cx) < a.r + b.r + gap and abs(a.cy - b.cy) < a.r + b.r + gap


def sample_attributes(rng, shapes, background, forbid=frozenset(), not_shape=None):
    """(shape, color, pattern, color2) by rejection: no forbidden combination, no clash."""
    while True:
        shape = _pick(rng, [s for s in shapes if s != not_shape])
        color = _pick(rng, [c for c in COLORS if c not in CLASHES[background]])
        pattern = _pick(rng, PATTERNS)
        color2 = "none" if pattern == "plain" else _pick(rng, contrasting(color))
        if (shape, color, pattern, color2) not in forbid:
            return shape, color, pattern, color2


def sample_scene(rng, world="pretrain", p_two=0.35):
    """One random scene. world="pretrain" holds out the concepts; world="probe" has everything."""
    shapes, forbid = (SHAPES, CONCEPT_KEYS) if world == "pretrain" else (ALL_SHAPES, frozenset())
    bg = _pick(rng, BACKGROUNDS)
    main = sample_attributes(rng, shapes, bg, forbid)
    if rng.random() < p_two:
        other = sample_attributes(rng, shapes, bg, forbid, not_shape=main[0])
        size_a = _pick(rng, ("medium", "large"))
        size_b = _pick(rng, [s for s in SIZES if SIZES[s] < SIZES[size_a]])
        for _ in range(30):  # rejection keeps both objects apart; a crowded draw falls back to one
            pos_a, pos_b = _pick(rng, POSITIONS), _pick(rng, POSITIONS)
            a = Obj(*main, size_a, pos_a, *place(rng, size_a, pos_a))
            b = Obj(*other, size_b, pos_b, *place(rng, size_b, pos_b))
            if pos_a != pos_b and not _overlap(a, b):
                return Scene(bg, (a, b), int(rng.integers(2**31)))
    size, pos = _pick(rng, SIZES), _pick(rng, POSITIONS)
    return Scene(bg, (Obj(*main, size, pos, *place(rng, size, pos)),), int(rng.integers(2**31)))


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj, noun, with_size=True):
    words = [obj.size] if with_size else []
    if obj.pattern == "plain":
        words += [obj.color, noun]
    elif obj.pattern == "dotted":
        words += [obj.color, noun, "with", obj.color2, "dots"]
    else:
        words += [obj.color, "and", obj.color2, obj.pattern, noun]
    return _article(words[0]) + " " + " ".join(words)


def describe(scene, rng, p_generic=0.1):
    """A caption and the noun used for each object (the entity words of the records)."""
    nouns = [o.shape for o in scene.objects]
    if rng.random() < p_generic:
        nouns[int(rng.integers(len(nouns)))] = GENERIC_NOUN
    with_size, with_pos = rng.random() < 0.8, rng.random() < 0.8
    objs = [object_phrase(o, n, with_size) for o, n in zip(scene.objects, nouns)]
    pos = [" " + POS_PHRASE[o.position] if with_pos else "" for o in scene.objects]
    bg, t = BG_PHRASE[scene.background], int(rng.integers(3))
    if len(objs) == 1:
        caption = [f"{objs[0]} {bg}" + ("," + pos[0] if with_pos else ""),
                   f"a photo of {objs[0]}{pos[0]} {bg}",
                   f"{objs[0]}{pos[0]} {bg}"][t]
    else:
        caption = [f"{objs[0]} and {objs[1]} {bg}",
                   f"{objs[0]}{pos[0]} and {objs[1]}{pos[1]} {bg}",
                   f"{objs[1]} next to {objs[0]} {bg}"][t]
    return caption, nouns


# ----------------------------------------------------------------------------------------------
# 3. Rendering: shapes as unit polygons/ellipses, procedural backgrounds, 4x supersampling

def _ngon(n, start_deg, radius=1.0, dy=0.0):
    a = np.deg2rad(start_deg) + 2 * np.pi * np.arange(n) / n
    return [(radius * math.cos(t), radius * math.sin(t) + dy) for t in a]


def _star(points=5, inner=0.45):
    a = np.deg2rad(-90) + np.pi * np.arange(2 * points) / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return [(r * math.cos(t), r * math.sin(t) + 0.1) for r, t in zip(rad, a)]


def _heart(n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return list(zip(x / 17, (y + 2) / 17))


# Each shape is a list of parts inside the unit square [-1, 1]^2 (y down): ("poly", points),
# ("ellipse", (x, y, rx, ry)) or ("erase", (x, y, rx, ry)), drawn in order.
SHAPE_PARTS = {
    "circle": [("ellipse", (0, 0, 0.95, 0.95))],
    "square": [("poly", [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])],
    "triangle": [("poly", _ngon(3, -90, 1.1, 0.22))],
    "star": [("poly", _star())],
    "heart": [("poly", _heart())],
    "diamond": [("poly", [(0, -1), (0.68, 0), (0, 1), (-0.68, 0)])],
    "cross": [("poly", [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
                        (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)])],
    "hexagon": [("poly", _ngon(6, 0))],
    "moon": [("ellipse", (0, 0, 0.95, 0.95)), ("erase", (0.45, -0.25, 0.8, 0.8))],
    "arrow": [("poly", [(-1, -0.28), (0.1, -0.28), (0.1, -0.75), (1, 0), (0.1, 0.75),
                        (0.1, 0.28), (-1, 0.28)])],
    "bolt": [("poly", [(0.05, -1), (0.8, -1), (0.3, -0.25), (0.75, -0.25), (-0.5, 1),
                       (-0.15, 0.12), (-0.6, 0.12)])],
    "flower": [("ellipse", (0.6 * math.cos(a), 0.6 * math.sin(a), 0.4, 0.4))
               for a in np.deg2rad(np.arange(5) * 72 - 90)] + [("ellipse", (0, 0.05, 0.35, 0.35))],
}


def shape_mask(shape, cx, cy, r, S):
    """Coverage mask (uint8 0/255) of a shape centred at (cx, cy) with radius r, in pixels."""
    img = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(img)
    for kind, g in SHAPE_PARTS[shape]:
        if kind == "poly":
            draw.polygon([(cx + x * r, cy + y * r) for x, y in g], fill=255)
        else:
            x, y, rx, ry = g
            box = [cx + (x - rx) * r, cy + (y - ry) * r, cx + (x + rx) * r, cy + (y + ry) * r]
            draw.ellipse(box, fill=255 if kind == "ellipse" else 0)
    return np.asarray(img)


def pattern_mask(pattern, u, v):
    """Where the secondary colour goes; u, v are coordinates from the object centre in periods."""
    if pattern == "striped":
        return np.floor(u + v) % 2 == 1                          # diagonal stripes
    if pattern == "dotted":
        return (u - np.round(u)) ** 2 + (v - np.round(v)) ** 2 < 0.3 ** 2
    if pattern == "checkered":
        return (np.floor(u) + np.floor(v)) % 2 == 1
    return np.zeros(u.shape, bool)


# Pattern period relative to the object radius: big enough that a small object still shows it.
PERIOD = {"plain": 1.0, "striped": 0.36, "dotted": 0.5, "checkered": 0.45}


@functools.lru_cache(maxsize=8)
def _grid(S):
    t = (np.arange(S, dtype=np.float32) + 0.5) / S
    return t[None, :], t[:, None]          # x varies along columns, y along rows


def _gradient(S, top, bottom):
    _, y = _grid(S)
    top, bottom = np.float32(top), np.float32(bottom)
    return np.broadcast_to(top + (bottom - top) * y[..., None], (S, S, 3)).copy()


def _dots(rng, S, n, rmin, rmax, region=1.0):
    """A mask of n random round dots (stars, flakes, cloud puffs), radii in fractions of S."""
    img = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(img)
    for x, y, r in zip(rng.random(n), rng.random(n) * region, rng.uniform(rmin, rmax, n)):
        draw.ellipse([(x - r) * S, (y - r) * S, (x + r) * S, (y + r) * S], fill=255)
    return np.asarray(img, np.float32)[..., None] / 255


def _mix(img, mask, color):
    return img * (1 - mask) + np.float32(color) * mask


def bg_sky(rng, S):
    img = _gradient(S, (70, 140, 225), (175, 210, 245))
    for _ in range(int(rng.integers(1, 4))):     # a cloud is a cluster of overlapping puffs
        cx, cy = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.8)
        puffs = Image.new("L", (S, S), 0)
        draw = ImageDraw.Draw(puffs)
        for dx, r in zip(rng.uniform(-0.12, 0.12, 4), rng.uniform(0.05, 0.09, 4)):
            draw.ellipse([(cx + dx - r) * S, (cy - r) * S, (cx + dx + r) * S, (cy + r * 0.6) * S],
                         fill=230)
        img = _mix(img, np.asarray(puffs, np.float32)[..., None] / 255, (255, 255, 255))
    return img


def bg_grass(rng, S):
    x, y = _grid(S)
    img = _gradient(S, (100, 175, 65), (45, 110, 35))
    cols = (x * 96).astype(int)[0]               # one blade per 1/96 of the width
    height, phase = rng.uniform(0.3, 1.0, 96)[cols], rng.random(96)[cols]
    blades = 0.75 + 0.45 * height * ((y * 6 + phase) % 1.0)  # sawtooth: dark roots, light tips
    return img * blades[..., None]


def bg_sand(rng, S):
    x, y = _grid(S)
    wobble = 0.6 * np.sin(2 * np.pi * x * 1.5 + rng.random() * 6)
    ripple = 0.06 * np.sin(2 * np.pi * (y * 9 + wobble))
    speck = 0.05 * (rng.random((S, S), dtype=np.float32) - 0.5)
    return np.float32((222, 196, 142)) * (1 + ripple + speck)[..., None]


def bg_snow(rng, S):
    x, y = _grid(S)
    img = _gradient(S, (185, 200, 225), (215, 225, 240))
    horizon = 0.38 + 0.05 * np.sin(2 * np.pi * x * 1.2 + rng.random() * 6)
    ground = (y > horizon)[..., None] * (1 - 0.04 * y[..., None])
    img = _mix(img, ground.astype(np.float32), (246, 248, 252))
    return _mix(img, _dots(rng, S, 45, 0.006, 0.014, region=0.6), (255, 255, 255))


def bg_water(rng, S):
    x, y = _grid(S)
    img = _gradient(S, (35, 100, 160), (15, 65, 125))
    waves = np.sin(2 * np.pi * (y * 14 + 0.25 * np.sin(2 * np.pi * x * 2 + rng.random() * 6)))
    crest = np.clip((waves - 0.7) * 3.3, 0, 1)[..., None]
    return _mix(img, crest * 0.8, (150, 200, 230))


def bg_brick(rng, S, rows=7, per_row=3.5):
    x, y = _grid(S)
    row = np.floor(y * rows)
    u = x * per_row + 0.5 * (row % 2)            # every other row shifted by half a brick
    shade = rng.uniform(0.8, 1.1, (rows + 1, int(per_row) + 2))[row.astype(int), u.astype(int)]
    img = np.float32((165, 65, 45)) * shade[..., None]
    mortar = ((y * rows) % 1 < 0.11) | (u % 1 < 0.05)
    return _mix(img, mortar[..., None].astype(np.float32), (205, 198, 185))


def bg_wood(rng, S, planks=4):
    x, y = _grid(S)
    plank = np.minimum(np.floor(y * planks), planks - 1).astype(int)
    phase, shade = rng.random(planks) * 6, rng.uniform(0.85, 1.1, planks)
    grain = 0.09 * np.sin(2 * np.pi * (y * 30 + 0.8 * np.sin(2 * np.pi * x * 1.3 + phase[plank])))
    img = np.float32((165, 112, 62)) * (shade[plank] * (1 + grain))[..., None]
    gap = ((y * planks) % 1 < 0.04)[..., None].astype(np.float32)
    return _mix(img, gap, (70, 42, 20))


def bg_night(rng, S):
    img = _gradient(S, (8, 12, 40), (32, 32, 78))
    return _mix(img, _dots(rng, S, 35, 0.003, 0.008), (255, 250, 220))


PAINTERS = {"sky": bg_sky, "grass": bg_grass, "sand": bg_sand, "snow": bg_snow,
            "water": bg_water, "brick": bg_brick, "wood": bg_wood, "night": bg_night}


def render(scene, size=64):
    """Draw a scene. Returns the RGB image (uint8 HxWx3) and the label map (uint8 HxW)."""
    S = size * SUPERSAMPLE
    img = PAINTERS[scene.background](np.random.default_rng(scene.texture_seed), S)
    coverage = []
    for o in scene.objects:
        cx, cy, r = o.cx * S, o.cy * S, o.r * S
        outer = shape_mask(o.shape, cx, cy, r, S)
        inner = shape_mask(o.shape, cx, cy, r - OUTLINE * S, S)
        # composite only inside the object's square: most of the canvas is background
        x0, y0 = max(int(cx - r) - 2, 0), max(int(cy - r) - 2, 0)
        x1, y1 = min(int(cx + r) + 3, S), min(int(cy + r) + 3, S)
        period = PERIOD[o.pattern] * r
        u = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx) / period
        v = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy) / period
        fill = np.where(pattern_mask(o.pattern, u, v)[..., None],
                        np.float32(COLORS.get(o.color2, (0, 0, 0))), np.float32(COLORS[o.color]))
        # a darker rim keeps the silhouette readable on any background
        rim = inner[y0:y1, x0:x1, None] < 128
        fill = np.where(rim, np.float32(COLORS[o.color]) * 0.45, fill)
        a = outer[y0:y1, x0:x1, None].astype(np.float32) / 255
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + fill * a
        coverage.append(outer)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).reduce(SUPERSAMPLE)
    labels = np.zeros((size, size), np.uint8)
    for k, outer in enumerate(coverage, start=1):
        labels[np.asarray(Image.fromarray(outer).reduce(SUPERSAMPLE)) >= 128] = k
    return np.asarray(image), labels


def boxes_from_labels(labels, n):
    """Tight pixel boxes [x1, y1, x2, y2] (x2, y2 exclusive) of labels 1..n."""
    boxes = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    return boxes


def ground_truth(scene, nouns, boxes):
    return [{"value": k, "label": noun, "box": box,
             "attributes": {f: getattr(o, f) for f in ("shape", "color", "pattern", "color2",
                                                       "size", "position")}}
            for k, (o, noun, box) in enumerate(zip(scene.objects, nouns, boxes), start=1)]


def make_sample(seed, index, size=64, world="pretrain"):
    """Everything about sample `index` of dataset `seed`: scene, image, labels, caption, record."""
    rng = np.random.default_rng((seed, index))
    scene = sample_scene(rng, world)
    caption, nouns = describe(scene, rng)
    image, labels = render(scene, size)
    record = {"caption": caption, "background": scene.background, "width": size, "height": size,
              "objects": ground_truth(scene, nouns, boxes_from_labels(labels, len(scene.objects)))}
    return scene, image, labels, record


# ----------------------------------------------------------------------------------------------
# 4. Concepts: reference images and eval prompts

def concept_backgrounds(concept):
    """(reference backgrounds, eval backgrounds): disjoint, so eval scenes are new scenes."""
    ok = [b for b in BACKGROUNDS if concept.color not in CLASHES[b]]
    i = CONCEPTS.index(concept) % len(ok) if concept in CONCEPTS else 0
    ok = ok[i:] + ok[:i]
    return ok[:3], ok[3:6]


def eval_prompts(concept):
    """Prompts with a `{}` for the concept phrase and what each asks for, machine-readable."""
    _, new_bgs = concept_backgrounds(concept)
    prompts = [{"id": f"scene_{b}", "text": "a {} " + BG_PHRASE[b], "asks": {"background": b}}
               for b in new_bgs]
    for pos in ("top left", "bottom right"):
        prompts.append({"id": "pos_" + pos.replace(" ", "_"), "text": "a {} " + POS_PHRASE[pos],
                        "asks": {"position": pos}})
    for size in ("small", "large"):
        prompts.append({"id": "size_" + size, "text": f"a {size} {{}}", "asks": {"size": size}})
    own = {concept.color, concept.color2}
    # an attribute change keeps the rest: the new colour must still contrast with the pattern
    color = next(c for c in ("green", "blue", "red", "yellow", "purple") if c not in own
                 and (concept.pattern == "plain" or concept.color2 in contrasting(c)))
    prompts.append({"id": "color_" + color, "text": "a {} in " + color, "asks": {"color": color}})
    if concept.pattern == "plain":
        prompts.append({"id": "pattern_striped", "text": "a striped {}",
                        "asks": {"pattern": "striped"}})
    else:  # a plain object has no secondary colour, so that is asked for too
        prompts.append({"id": "pattern_plain", "text": "a plain {}",
                        "asks": {"pattern": "plain", "color2": "none"}})
    shape = next(s for s in ("circle", "square", "triangle") if s != concept.shape)
    color = next(c for c in ("blue", "red", "green", "yellow") if c not in own)
    prompts.append({"id": f"next_to_{color}_{shape}",
                    "text": f"a {{}} next to a small {color} {shape}",
                    "asks": {"other_object": {"shape": shape, "color": color}}})
    return prompts


def scene_for(concept, asks, rng):
    """A ground-truth scene that fulfils `asks` with the concept as the main object."""
    shape, color, pattern, color2 = (asks.get(k, v) for k, v in concept.attributes().items())
    if pattern != "plain" and color2 not in contrasting(color):  # "a striped {}" of a plain one
        color2 = _pick(rng, contrasting(color))
    other = asks.get("other_object")
    visible = [b for b in BACKGROUNDS
               if color not in CLASHES[b] and not (other and other["color"] in CLASHES[b])]
    bg = asks.get("background") or _pick(rng, visible)
    size = asks.get("size") or _pick(rng, ("medium", "large") if other else SIZES)
    for _ in range(100):
        pos = asks.get("position") or _pick(rng, POSITIONS)
        objs = (Obj(shape, color, pattern, color2, size, pos, *place(rng, size, pos)),)
        if other:  # small, so that the concept stays the main (larger) object
            pos2 = _pick(rng, [p for p in POSITIONS if p != pos])
            objs += (Obj(other["shape"], other["color"], "plain", "none", "small", pos2,
                         *place(rng, "small", pos2)),)
            if _overlap(*objs):
                continue
        return Scene(bg, objs, int(rng.integers(2**31)))
    raise RuntimeError(f"could not place {concept.id} for {asks}")


def concept_references(concept, n=5, size=64, seed=0):
    """n reference images of a concept: varied backgrounds (from 3), positions and sizes."""
    rng = np.random.default_rng((seed, 1000 + CONCEPTS.index(concept)))
    ref_bgs, _ = concept_backgrounds(concept)
    out = []
    for i in range(n):
        asks = {"background": ref_bgs[i % 3], "size": ("medium", "large")[i % 2]}
        scene = scene_for(concept, asks, rng)
        out.append((scene, render(scene, size)[0]))
    return out


def concept_json(concept):
    return {"id": concept.id, "class_word": concept.class_word, "attributes": concept.attributes(),
            "eval_prompts": eval_prompts(concept)}


def reference_images(concept):
    """A concept's reference images: those of its make-concepts folder, or else rendered (make-concepts' defaults)."""
    if not concept.folder:
        return [im for _, im in concept_references(concept)]
    with open(os.path.join(concept.folder, "concept.json")) as f:
        files = [r["file"] for r in json.load(f).get("references", [])]
    files = files or sorted(f for f in os.listdir(concept.folder) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not files:
        raise SystemExit(f"{concept.folder} has no reference images for CLIP-I; pass --clip-model none to skip it.")
    return [np.asarray(Image.open(os.path.join(concept.folder, f)).convert("RGB")) for f in files]


def find_concept(name):
    """A built-in concept by id, or one described by DIR/concept.json."""
    for c in CONCEPTS:
        if c.id == name:
            return c
    path = os.path.join(name, "concept.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                d = json.load(f)
            c = Concept(d["id"], d["class_word"], **d["attributes"], folder=name)
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path} is not a concept.json as make-concepts writes it (id, class_word, attributes "
                             f"{list(IDENTITY)}): {e!r}.")
        vocab = {"shape": ALL_SHAPES, "color": COLORS, "pattern": PATTERNS, "color2": ("none", *COLORS)}
        if bad := [f"{k} {v!r}" for k, v in c.attributes().items() if v not in vocab[k]]:
            raise SystemExit(f"{path}: {', '.join(bad)} is outside the toy world's vocabulary, which the probes read.")
        return c
    raise SystemExit(f"Unknown concept {name!r}: use one of {[c.id for c in CONCEPTS]} or a "
                     "folder with a concept.json written by make-concepts.")


# ----------------------------------------------------------------------------------------------
# 5. Writers (atomic files, refuse non-empty folders) and the record reader

def atomic_write(path, data):
    """Bytes to a temporary file, then os.replace: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates private (0600) files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def png_bytes(array, palette=False):
    img = Image.fromarray(array)
    if palette:  # label map: value k stays k when read back; the palette only helps viewers
        img = img.convert("P")
        img.putpalette([0, 0, 0] + [c for rgb in COLORS.values() for c in rgb] * 25)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def prepare_out(path, overwrite):
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise SystemExit(f"{path} is not empty; choose a new folder or pass --overwrite.")
    os.makedirs(path, exist_ok=True)


def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def save_generated(folder, images, concept_id, prompt_ids, method, per_prompt=1):
    """Write a method's images for `eval` (METHOD_CONCEPT_PROMPT_K.png) and return their manifest rows."""
    rows = []
    for k, (im, pid) in enumerate(zip(images, prompt_ids)):
        name = f"{method}_{concept_id}_{pid}_{k % per_prompt}.png"
        sdm.save_image(im, Path(folder) / name)
        rows.append({"file": name, "concept": concept_id, "prompt": pid, "method": method})
    return rows


def make_data(out, n, seed=0, size=64, overwrite=False):
    prepare_out(out, overwrite)
    rows = []
    for i in tqdm(range(n), desc="make-data"):
        _, image, _, rec = make_sample(seed, i, size)
        atomic_write(os.path.join(out, f"{i:06d}.png"), png_bytes(image))
        rows.append({"file": f"{i:06d}.png", **rec})
    write_jsonl(os.path.join(out, "captions.jsonl"), rows)  # the index is written last


def record_files(seed, i, size):
    _, image, labels, rec = make_sample(seed, i, size)
    key = f"{i:06d}"
    return [(f"{key}.png", png_bytes(image)), (f"{key}.json", json.dumps(rec).encode()),
            (f"{key}.mask.png", png_bytes(labels, palette=True))]


def make_records(out, n, seed=0, size=64, shard_size=None, overwrite=False):
    prepare_out(out, overwrite)
    if not shard_size:
        for i in tqdm(range(n), desc="make-records"):
            for name, data in record_files(seed, i, size):
                atomic_write(os.path.join(out, name), data)
        return
    for shard, start in enumerate(tqdm(range(0, n, shard_size), desc="shards")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(start, min(start + shard_size, n)):
                for name, data in record_files(seed, i, size):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0  # fixed mtime: same seed, same bytes
                    tar.addfile(info, io.BytesIO(data))
        atomic_write(os.path.join(out, f"{shard:05d}.tar"), buf.getvalue())


def read_records(path):
    """Yield (key, image uint8 HxWx3, record dict, labels uint8 HxW) from a folder or tar shards."""
    def decode(files):
        return (np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB")),
                json.loads(files["json"]), np.asarray(Image.open(io.BytesIO(files["mask.png"]))))

    names = sorted(os.listdir(path))
    tars = [n for n in names if n.endswith(".tar")]
    if not tars:
        for name in names:
            if name.endswith(".json"):
                key = name[:-5]
                files = {}
                for ext in ("png", "json", "mask.png"):
                    with open(os.path.join(path, f"{key}.{ext}"), "rb") as f:
                        files[ext] = f.read()
                yield (key, *decode(files))
        return
    for name in tars:
        with tarfile.open(os.path.join(path, name)) as tar:
            samples = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key in sorted(samples):
                yield (key, *decode(samples[key]))


def make_concepts(out, n_refs=5, size=64, seed=0, overwrite=False):
    prepare_out(out, overwrite)
    for concept in tqdm(CONCEPTS, desc="make-concepts"):
        folder = os.path.join(out, concept.id)
        os.makedirs(folder, exist_ok=True)
        refs = []
        for i, (scene, image) in enumerate(concept_references(concept, n_refs, size, seed)):
            atomic_write(os.path.join(folder, f"{i:02d}.png"), png_bytes(image))
            o = scene.objects[0]
            refs.append({"file": f"{i:02d}.png", "background": scene.background,
                         "size": o.size, "position": o.position})
        atomic_write(os.path.join(folder, "concept.json"),
                     json.dumps({**concept_json(concept), "references": refs}, indent=1).encode())


def make_oracle(out, per_prompt=2, size=64, seed=0, overwrite=False):
    """Ground-truth images for every concept x prompt: the best score the benchmark can give."""
    prepare_out(out, overwrite)
    rows = []
    for ci, concept in enumerate(CONCEPTS):
        for p in eval_prompts(concept):
            for j in range(per_prompt):
                scene = scene_for(concept, p["asks"], np.random.default_rng((seed, ci, len(rows))))
                name = f"{concept.id}_{p['id']}_{j}.png"
                atomic_write(os.path.join(out, name), png_bytes(render(scene, size)[0]))
                rows.append({"file": name, "concept": concept.id, "prompt": p["id"],
                             "method": "oracle"})
    write_jsonl(os.path.join(out, "manifest.jsonl"), rows)


# ----------------------------------------------------------------------------------------------
# 6. Attribute probes: a small CNN that reads the scene, the main object and the other one

PROBE_HEADS = {"background": BACKGROUNDS, "position": POSITIONS, "size": tuple(SIZES),
               "shape": ALL_SHAPES, "color": tuple(COLORS), "pattern": PATTERNS,
               "color2": ("none",) + tuple(COLORS),
               "other_shape": ("none",) + ALL_SHAPES, "other_color": ("none",) + tuple(COLORS)}


@dataclass(frozen=True)
class ProbeConfig:
    image_size: int = 64
    channels: tuple = (32, 48, 64, 96)   # conv stages; all but the last halve the resolution
    hidden: int = 128


# what each head reads: the whole feature map, the main object's slot, or the other object's
HEAD_SLOT = {"background": "scene", "position": "main", "size": "main", "shape": "main",
             "color": "main", "pattern": "main", "color2": "main",
             "other_shape": "other", "other_color": "other"}


class Probes(nn.Module):
    """A small CNN read out by two attention "slots": one finds the main object, one the other.

    Shape and colour do not depend on where an object is, so each slot pools the feature map with
    its own softmax attention (translation invariant), and the flattened attention map itself
    tells position and size. Which object is "main" is learnt from the labels (the larger one).
    """

    def __init__(self, cfg=ProbeConfig()):
        super().__init__()
        self.image_size = cfg.image_size
        layers, c_in = [], 3
        for i, c in enumerate(cfg.channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i < len(cfg.channels) - 1 else []
            c_in = c
        self.trunk = nn.Sequential(*layers)
        cells = (cfg.image_size >> (len(cfg.channels) - 1)) ** 2
        self.attend = nn.Conv2d(c_in, 2, 1)
        self.slots = nn.ModuleList(nn.Sequential(nn.Linear(c_in + cells, cfg.hidden), nn.ReLU())
                                   for _ in range(2))
        self.scene = nn.Sequential(nn.Linear(c_in, cfg.hidden), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.hidden, len(v))
                                    for k, v in PROBE_HEADS.items()})

    def forward(self, x):  # x: RGB in [0, 1], (b, 3, h, w)
        f = self.trunk((x - 0.5) / 0.25)
        attn = self.attend(f).flatten(2).softmax(-1)               # (b, 2 slots, h*w)
        pooled = torch.einsum("bsn,bcn->bsc", attn, f.flatten(2))
        h = {"main": self.slots[0](torch.cat([pooled[:, 0], attn[:, 0]], 1)),
             "other": self.slots[1](torch.cat([pooled[:, 1], attn[:, 1]], 1)),
             "scene": self.scene(f.mean((2, 3)))}
        return {k: head(h[HEAD_SLOT[k]]) for k, head in self.heads.items()}


def probe_labels(scene):
    main = scene.objects[0]
    other = scene.objects[1] if len(scene.objects) > 1 else None
    names = {"background": scene.background, "position": main.position, "size": main.size,
             "shape": main.shape, "color": main.color, "pattern": main.pattern,
             "color2": main.color2, "other_shape": other.shape if other else "none",
             "other_color": other.color if other else "none"}
    return {k: PROBE_HEADS[k].index(v) for k, v in names.items()}


def probe_dataset(seed, n, size=64, desc="render"):
    images = np.zeros((n, size, size, 3), np.uint8)
    labels = {k: np.zeros(n, np.int64) for k in PROBE_HEADS}
    for i in tqdm(range(n), desc=desc, leave=False):
        rng = np.random.default_rng((seed, i))
        scene = sample_scene(rng, world="probe", p_two=0.3)
        images[i] = render(scene, size)[0]
        for k, v in probe_labels(scene).items():
            labels[k][i] = v
    images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return images, {k: torch.from_numpy(v) for k, v in labels.items()}


def degrade(x, g):
    """Blur, noise and contrast jitter, so the probes also read a diffusion model's images."""
    b = x.shape[0]
    a = torch.rand(b, 1, 1, 1, generator=g)
    x = x * (1 - a) + F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) * a
    x = (x - 0.5) * (0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=g)) + 0.5
    x = x + 0.05 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


@torch.no_grad()
def probe_accuracy(model, images, labels, batch=256):
    model.eval()
    hits = {k: 0 for k in PROBE_HEADS}
    for s in range(0, len(images), batch):
        logits = model(images[s:s + batch].float() / 255)
        for k in PROBE_HEADS:
            hits[k] += (logits[k].argmax(1) == labels[k][s:s + batch]).sum().item()
    return {k: round(v / len(images), 4) for k, v in hits.items()}


def train_probes(out, steps=3500, batch_size=64, n_train=24000, n_val=2000, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = ProbeConfig()
    x_tr, y_tr = probe_dataset(seed, n_train, cfg.image_size, "render train")
    x_va, y_va = probe_dataset(seed + 1, n_val, cfg.image_size, "render val")  # fresh scenes
    model = Probes(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="train-probes")
    for step in bar:
        model.train()
        idx = torch.randint(0, n_train, (batch_size,), generator=g)
        logits = model(degrade(x_tr[idx].float() / 255, g))
        loss = sum(F.cross_entropy(logits[k], y_tr[k][idx]) for k in PROBE_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    acc = probe_accuracy(model, x_va, y_va)
    print(json.dumps(acc, indent=1))
    meta = {"format": "toy_world probes", "config": json.dumps(asdict(cfg)),
            "heads": json.dumps(PROBE_HEADS), "val_accuracy": json.dumps(acc),
            "steps": str(steps), "seed": str(seed), "n_train": str(n_train), "n_val": str(n_val)}
    # fp16 halves the committed file; the probes are evaluated in fp32 after loading
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, safetensors_bytes(tensors, metadata=meta))
    return acc


def load_probes(path):
    if not os.path.isfile(path):
        raise SystemExit(f"No probes at {path}; train them with "
                         f"`python toy_world.py train-probes --out {path}`.")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # safetensors raises its own error type for a file that is not safetensors
        meta = {}
    if meta.get("format") != "toy_world probes":
        raise SystemExit(f"{path} is not a probes file written by `toy_world.py train-probes`.")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if json.loads(meta["heads"]) != {k: list(v) for k, v in PROBE_HEADS.items()}:
        raise SystemExit(f"{path} was trained on another vocabulary; retrain with train-probes.")
    cfg = json.loads(meta["config"])
    model = Probes(ProbeConfig(cfg["image_size"], tuple(cfg["channels"]), cfg["hidden"]))
    model.load_state_dict(state)
    return model.eval(), meta


@torch.no_grad()
def predict(model, images, batch=256):
    """Attribute names for each image (uint8 HxWx3; other sizes are resized to the probes')."""
    side = model.image_size
    x = np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize((side, side), Image.BOX))
                  if im.shape[:2] != (side, side) else im for im in images])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    preds = []
    for s in range(0, len(x), batch):
        logits = model(x[s:s + batch])
        idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
        preds += [{k: PROBE_HEADS[k][idx[k][i]] for k in PROBE_HEADS}
                  for i in range(len(idx["shape"]))]
    return preds


# ----------------------------------------------------------------------------------------------
# 7. Benchmark: concept fidelity and prompt fidelity per method, concept and prompt

def score(pred, concept, asks):
    """0/1 agreements: concept attributes the prompt leaves alone, and what the prompt asks."""
    changed = set(asks) | ({"color2"} if "pattern" in asks else set())
    fidelity = {a: float(pred[a] == getattr(concept, a)) for a in IDENTITY if a not in changed}
    prompt = {}
    for a, want in asks.items():
        if a == "other_object":
            prompt["other_shape"] = float(pred["other_shape"] == want["shape"])
            prompt["other_color"] = float(pred["other_color"] == want["color"])
        else:
            prompt[a] = float(pred[a] == want)
    return fidelity, prompt


def find_prompt(concept, prompt):
    """An eval prompt by id, by template, or by its text with any concept phrase filled in."""
    for p in eval_prompts(concept):
        pattern = re.escape(p["text"]).replace(r"\{\}", ".+")
        if prompt in (p["id"], p["text"]) or re.fullmatch(pattern, prompt):
            return p
    raise SystemExit(f"Prompt {prompt!r} is not an eval prompt of {concept.id}; use one of "
                     f"{[p['id'] for p in eval_prompts(concept)]}.")


def _mean(xs):
    xs = list(xs)
    return round(float(np.mean(xs)), 4) if xs else None


def summarize(rows):
    out = {"concept_fidelity": _mean(r["concept_fidelity"] for r in rows),
           "prompt_fidelity": _mean(r["prompt_fidelity"] for r in rows), "n": len(rows)}
    for part in ("concept_attributes", "prompt_attributes"):
        names = sorted({a for r in rows for a in r[part]})
        out[part] = {a: _mean(r[part][a] for r in rows if a in r[part]) for a in names}
    return out


def evaluate(images_dir, manifest, model, concept=None, clip=None):
    """Score every manifest row with the probes and average per method, concept and prompt.

    With `clip` (a ToyCLIP), also the DreamBench-style similarities in the toy CLIP's space:
    `clip_t` against the prompt with the class word in place of the concept phrase, and `clip_i`
    against the mean embedding of the concept's reference images.
    """
    todo, images = [], []
    for line in manifest:
        if concept and line.get("concept", concept.id) != concept.id:
            continue
        if not concept and "concept" not in line:
            raise SystemExit(f"Manifest row for {line['file']} names no concept; add one or "
                             "pass --concept.")
        c = concept or find_concept(line["concept"])
        path = os.path.join(images_dir, line["file"])
        try:
            images.append(np.asarray(Image.open(path).convert("RGB")))
        except OSError as e:
            raise SystemExit(f"Cannot read {path}, listed in the manifest: {e}")
        todo.append((line, c, find_prompt(c, line["prompt"])))
    if not todo:
        raise SystemExit("The manifest lists no images for this concept.")
    rows = []
    for (line, c, p), pred, image in zip(todo, predict(model, images), images):
        fid, pro = score(pred, c, p["asks"])
        row = {**line, "concept": c.id, "prompt_id": p["id"], "predicted": pred,
               "concept_attributes": fid, "prompt_attributes": pro,
               "concept_fidelity": _mean(fid.values()), "prompt_fidelity": _mean(pro.values())}
        rows.append(row)
    if clip is not None:
        t_sims = clip.text_similarity(images, [p["text"].format(c.class_word) for _, c, p in todo])
        i_sims = clip.image_similarity(images, [c for _, c, _ in todo])
        for row, ts, si in zip(rows, t_sims, i_sims):
            row["clip_t"], row["clip_i"] = ts, si
    results = {"images": rows}
    for level, keys in (("methods", ("method",)), ("per_concept", ("method", "concept")),
                        ("per_prompt", ("method", "concept", "prompt_id"))):
        groups = {}
        for r in rows:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
        results[level] = {}
        for key, grp in groups.items():  # nested: results[level][method][concept][prompt]
            d = results[level]
            for k in key[:-1]:
                d = d.setdefault(k, {})
            d[key[-1]] = summarize(grp)
            for sim in ("clip_t", "clip_i") if clip is not None else ():
                d[key[-1]][sim] = _mean(r[sim] for r in grp)
    return results


class ToyCLIP:
    """The toy CLIP's towers as a metric (Radford et al. 2021): cosine similarity of projected,
    normalised embeddings. CLIP-I compares with the concept's 5 reference images (mean embedding)."""

    def __init__(self, model_dir=None):
        sd = sdm.StableDiffusion.from_pretrained(model_dir)
        self.text, self.tok = sd.text_encoder, sd.tokenizer
        self.vision = sdm.StableDiffusion.load_image_encoder(model_dir)
        self._refs = {}

    @torch.no_grad()
    def embed_images(self, images):
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return F.normalize(torch.cat([self.vision(self.vision.preprocess(x[i:i + 256]))[1]
                                      for i in range(0, len(x), 256)]), dim=-1)

    @torch.no_grad()
    def text_similarity(self, images, texts):
        t = F.normalize(self.text(self.tok(texts))[1], dim=-1)
        return (self.embed_images(images) * t).sum(-1).tolist()

    @torch.no_grad()
    def image_similarity(self, images, concepts):
        keys = [(c, c.folder) for c in concepts]  # a concept read from a folder: the references in it
        for c, folder in set(keys) - set(self._refs):
            self._refs[c, folder] = F.normalize(self.embed_images(reference_images(c)).mean(0), dim=-1)
        refs = torch.stack([self._refs[k] for k in keys])
        return (self.embed_images(images) * refs).sum(-1).tolist()


def markdown_table(results):
    clip = any("clip_t" in s for s in results["methods"].values())
    lines = ["| method | concept fidelity | prompt fidelity |" + (" CLIP-I | CLIP-T |" if clip else "") + " n |",
             "|---|---|---|" + ("---|---|" if clip else "") + "---|"]
    for m, s in sorted(results["methods"].items()):
        sims = f" {s['clip_i']:.3f} | {s['clip_t']:.3f} |" if clip else ""
        lines.append(f"| {m} | {s['concept_fidelity']:.3f} | {s['prompt_fidelity']:.3f} |{sims} {s['n']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 8. The toy Stable Diffusion and toy CLIP: configs, pretraining data, the three training stages
#
# The same sd_model.py classes as SD 1.5 with smaller numbers: a UNet with SD1.5's block layout
# (4 levels, attention at the first 3, 2 res blocks per level, so 16 transformer blocks and every
# method's layer rule applies unchanged), a KL VAE with f = 4 (64 px images -> 16x16x4 latents),
# and a CLIP whose 4-layer text tower is the SD text encoder and whose ViT image tower gives patch
# tokens and a pooled embedding in the text width (what Subject-Diffusion needs). Trained as SD
# was: CLIP contrastively (Radford et al. 2021), the VAE as a KL autoencoder (LDM Sec. 3.1,
# without the GAN and LPIPS terms), then the UNet on the frozen encoders (LDM Eq. 2), with
# 10 % of captions dropped for classifier-free guidance (Ho & Salimans 2022) and an EMA.

TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy", "sd")
# 8 GroupNorm groups, not LDM's 32: at 32 channels, 32 groups is a per-channel instance norm, which
# erases every channel's image mean right before the output conv, so a flat region's colour cannot be
# represented. With 32 groups the VAE's reconstructions had the object colour right (by the probes)
# on 33 % of images at step 1000, with 8 groups on 49 %; L1 fell twice as fast. 4 channels a group
# is SD's own ratio at its widest level (128 / 32).
TOY_SD = sdm.SDConfig(
    "toy",
    sdm.UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), transformer_depth=(1, 1, 1, 0), num_heads=4,
                   context_dim=64, norm_groups=8),
    sdm.VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=2, norm_groups=8),
    sdm.CLIPTextConfig(width=64, layers=4, heads=2, mlp_dim=256, projection_dim=64),
    image_size=64)
TOY_VISION = sdm.CLIPVisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4,
                                  mlp_dim=512, act="quick_gelu", projection_dim=64)


def save_toy(out, parts, cfg=TOY_SD, vision=TOY_VISION, dtype=torch.float16):
    """Write a model in the converted layout `from_pretrained` reads (fp16 halves the files)."""
    import weights_convert as wc

    parts = {p: {k: v.detach().to(dtype) for k, v in sd.items()} for p, sd in parts.items()}
    wc.write_parts(Path(out), cfg, parts, vision if "image_encoder" in parts else None)


MODEL_FILES = ("unet.safetensors", "vae.safetensors", "text_encoder.safetensors", "image_encoder.safetensors", "config.json")


def check_export(dst):
    """--export replaces a model folder as a whole, so a folder holding anything else is refused before training starts."""
    if dst and os.path.exists(dst) and (not os.path.isdir(dst) or set(os.listdir(dst)) - set(MODEL_FILES)):
        raise SystemExit(f"--export {dst} is not a model folder (it holds other files, or is a file); choose a new folder "
                         "or a model folder to replace.")


def export_model(src, dst):
    """Copy the model in `src` to `dst` as a whole: written beside it, then swapped in, so an interrupted export leaves
    the old model (or, between the two renames, none), never the files of two models."""
    check_export(dst)
    parent, name = os.path.split(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        for f in MODEL_FILES:
            shutil.copyfile(os.path.join(src, f), os.path.join(tmp, f))
        os.chmod(tmp, 0o755)  # mkdtemp makes a private (0700) folder
        if os.path.isdir(dst):
            os.replace(dst, tmp + ".old")
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp + ".old", ignore_errors=True)


def init_sd(out, seed=0):
    """A toy-shaped model with random weights: for trying commands before the real one exists."""
    torch.manual_seed(seed)
    model = sdm.StableDiffusion(TOY_SD)
    parts = {p: getattr(model, p).state_dict() for p in ("unet", "vae", "text_encoder")}
    parts["image_encoder"] = sdm.CLIPVisionModel(TOY_VISION).state_dict()
    save_toy(out, parts, dtype=torch.float32)


def _render_chunk(args):
    seed, start, stop, size = args
    imgs, caps = np.zeros((stop - start, size, size, 3), np.uint8), []
    for i in range(start, stop):
        _, imgs[i - start], _, rec = make_sample(seed, i, size)
        caps.append(rec["caption"])
    return start, imgs, caps


def pretrain_data(out, n, seed=0, size=64, workers=2, overwrite=False):
    """N pretraining scenes as one uint8 array (images.npy, memory-mapped by the stages) plus
    captions.json; rendered once, since every stage reads them several times."""
    from multiprocessing import Pool

    if n < 1:
        raise SystemExit(f"--n must be at least 1 (got {n}).")
    # What an interrupted run leaves (captions.json comes first, temporary files) is taken over, so a rerun goes on;
    # finished data (images.npy) or anything else needs --overwrite, as every stage's output folder does.
    held = {f for f in os.listdir(out) if f != "captions.json" and not f.endswith(".tmp")} if os.path.isdir(out) else set()
    if held and not overwrite:
        raise SystemExit(f"{out} already holds {'pretraining data' if 'images.npy' in held else 'other files'}; pass "
                         "--overwrite to render it again, or choose a new folder.")
    os.makedirs(out, exist_ok=True)
    tmp, images = os.path.join(out, ".images.npy.tmp"), os.path.join(out, "images.npy")
    try:
        arr = np.lib.format.open_memmap(tmp, "w+", np.uint8, (n, size, size, 3))
        captions = [None] * n
        chunks = [(seed, s, min(s + 1000, n), size) for s in range(0, n, 1000)]
        with Pool(workers) if workers else contextlib.nullcontext() as pool:  # 0: here, as a DataLoader's workers
            for start, imgs, caps in tqdm((pool.imap_unordered if pool else map)(_render_chunk, chunks),
                                          total=len(chunks), desc="render"):
                arr[start:start + len(imgs)], captions[start:start + len(caps)] = imgs, caps
        arr.flush()
        del arr
        if os.path.exists(images):  # --overwrite: the old images go before the new captions, never beside them
            os.unlink(images)
        atomic_write(os.path.join(out, "captions.json"), json.dumps(captions).encode())
        os.replace(tmp, images)  # last: `pretrain` takes images.npy for finished data
    finally:  # a crash leaves no multi-GB temporary file behind
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_pretrain_data(folder):
    path = os.path.join(folder, "images.npy")
    if not os.path.isfile(path):
        raise SystemExit(f"No pretraining data in {folder}; make it with "
                         f"`python toy_world.py pretrain-data --out {folder}`.")
    with open(os.path.join(folder, "captions.json")) as f:
        return np.load(path, mmap_mode="r"), json.load(f)


def _pixels(arr, idx, device="cpu"):
    """uint8 (b, h, w, 3) rows of a memory-mapped array -> (b, 3, h, w) in [-1, 1] on `device`."""
    x = torch.from_numpy(np.stack([arr[i] for i in idx.tolist()])).to(device).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1


@dataclass
class ToyArgs(sdm.TrainArgs):
    data: str = "outputs/toy/data"  # folder written by pretrain-data
    stage_dir: str = "outputs/toy"  # where the clip/ and vae/ stages wrote their results
    threads: int = 2
    minima = {"threads": 1}  # checked by sdm.parse_args


@dataclass
class ClipArgs(ToyArgs):
    output_dir: str = "outputs/toy/clip"
    train_batch_size: int = 256
    max_train_steps: int = 600
    learning_rate: float = 5e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    checkpointing_steps: int = 500
    hard_negatives: bool = False  # NegCLIP: each caption's shape or position swapped, as an extra negative text


@dataclass
class VaeArgs(ToyArgs):
    output_dir: str = "outputs/toy/vae"
    train_batch_size: int = 8
    max_train_steps: int = 6000
    learning_rate: float = 6e-4
    perceptual_weight: float = 2.0
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    checkpointing_steps: int = 500


# The shipped UNet: UnetArgs' 2400 steps, then the same run resumed with --max-train-steps 7600, which
# re-spreads the cosine schedule over 7600 steps (a warm restart at 2400) while the EMA and data order carry on.
SHIPPED_UNET_STEPS = (2400, 7600)


@dataclass
class UnetArgs(ToyArgs):
    output_dir: str = "outputs/toy/unet"
    train_batch_size: int = 32
    max_train_steps: int = 2400
    learning_rate: float = 3e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 200
    max_grad_norm: float = 1.0
    checkpointing_steps: int = 500
    validation_prompt: str = "a large red star on the grass"
    validation_steps: int = 800
    ema: float = 0.998  # EMA decay of the UNet weights (the EMA ships); 0.998^2400 leaves <1 % of the init
    latent_images: int = 32000  # the first N pretraining images (0 = all); their latents are encoded once (~10 ms each)
    export: str = TOY_DIR  # where the finished model goes ("" = only output_dir)
    minima = {**ToyArgs.minima, "latent_images": 0}


def _load(path):
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: run the earlier pretraining stage first (see `pretrain`).")
    return load_file(path)


def _clip_towers(folder=None):
    text, vision = sdm.CLIPTextModel(TOY_SD.text), sdm.CLIPVisionModel(TOY_VISION)
    if folder is not None:
        text.load_state_dict(_load(os.path.join(folder, "text_encoder.safetensors")))
        vision.load_state_dict(_load(os.path.join(folder, "image_encoder.safetensors")))
    return text, vision


def hard_negative(rng, caption: str) -> str | None:
    """The caption with one shape word or one position phrase swapped for another value (None if it has neither).

    Random batches let a contrastive model separate captions by colour and background alone, so it learns
    to treat shape and position as a bag of words (Yuksekgonul et al. 2023, Sec. 4); NegCLIP's remedy
    (their Sec. 5) adds, for every image, its caption minimally altered as a negative text."""
    words = caption.split(" ")
    spots = [("shape", i) for i, w in enumerate(words) if w.rstrip(",") in SHAPES]
    spots += [("position", p) for p in POSITIONS if POS_PHRASE[p] in caption]
    if not spots:
        return None
    kind, where = spots[rng.integers(len(spots))]
    if kind == "position":
        return caption.replace(POS_PHRASE[where], POS_PHRASE[_pick(rng, [p for p in POSITIONS if p != where])], 1)
    w = words[where]
    words[where] = _pick(rng, [x for x in SHAPES if x != w.rstrip(",")]) + w[len(w.rstrip(",")):]
    return " ".join(words)


def clip_loss(scale, v, t, owner):
    """CLIP's symmetric cross-entropy (Radford et al. 2021, Fig. 3) for B images `v` and texts `t`: the
    B captions first, then hard negatives, negative k belonging to image owner[k]. An image competes with
    every caption and with its own negatives only (another image's negative is not wrong for it); the
    text-to-image direction is over the captions alone, as a negative has no image of its own."""
    b = len(v)
    logits = scale * v @ t.T  # b x (b + negatives)
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[:, b:] = owner[None, :] == torch.arange(b, device=v.device)[:, None]
    logits = logits.masked_fill(~mask, float("-inf"))
    target = torch.arange(b, device=v.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2
    return loss, {"acc": (logits.argmax(1) == target).float().mean().item()}


def train_clip(a: ToyArgs):
    """Contrastive pretraining of both towers (Radford et al. 2021, Fig. 3): symmetric
    cross-entropy over the cosine similarities of a batch, with a learnt temperature;
    with --hard-negatives, each image's texts also include its caption with a swapped shape or position."""
    arr, captions = load_pretrain_data(a.data)
    torch.manual_seed(a.seed)
    device = sdm.pick_device(a.device)
    text, vision = (m.to(device) for m in _clip_towers())
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    tok = sdm.CLIPTokenizer()
    params = [*text.parameters(), *vision.parameters()]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.1},
                             {"params": [log_scale], "weight_decay": 0.0}], lr=a.learning_rate)

    def loss_fn(g):
        idx = torch.randint(0, len(arr), (a.train_batch_size,), generator=g)
        texts = [captions[i] for i in idx.tolist()]
        negs = []
        if a.hard_negatives:
            rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g)))
            negs = [hard_negative(rng, c) for c in texts]
        ids = tok(texts + [c for c in negs if c is not None])
        # the causal text tower pools at <|endoftext|>, which never sees later positions: cut them
        ids = ids[:, : int((ids == tok.eos_id).int().argmax(1).max()) + 1]
        t = F.normalize(text(ids.to(device))[1], dim=-1)
        v = F.normalize(vision(vision.preprocess(_pixels(arr, idx, device)))[1], dim=-1)
        owner = torch.tensor([i for i, c in enumerate(negs) if c is not None], dtype=torch.long, device=device)
        return clip_loss(log_scale.clamp(max=math.log(100)).exp(), v, t, owner)

    def save(folder):
        sdm.save_safetensors(text.state_dict(), Path(folder) / "text_encoder.safetensors")
        sdm.save_safetensors(vision.state_dict(), Path(folder) / "image_encoder.safetensors")

    tensors = {**{f"text.{k}": v for k, v in text.state_dict(keep_vars=True).items()},
               **{f"vision.{k}": v for k, v in vision.state_dict(keep_vars=True).items()},
               "log_scale": log_scale}
    sdm.train_loop(a, opt, tensors, loss_fn, save, torch.Generator().manual_seed(a.seed), device=device)


def train_vae(a: ToyArgs):
    """KL autoencoder (LDM Sec. 3.1): L1 + L2 + a perceptual term + 1e-6 KL, no GAN.

    LDM's perceptual term is LPIPS on VGG features; here the frozen toy CLIP image tower plays
    VGG's part (unit-normalised tokens of every layer, LPIPS-style). Without it, pixel losses
    spent the small decoder on background textures and washed out the objects' colours and
    patterns (in an earlier run the probes read colour right on 42 % of reconstructions at step
    1000, against 66 % with it at step 1500; both with 32 groups, see TOY_SD). Whole images,
    not crops: on 32 px crops the mid-block attention (8x8 tokens instead of 16x16) did not carry
    over to full size, whose reconstructions came out hazy and framed."""
    arr, _ = load_pretrain_data(a.data)
    crop, f = a.resolution or arr.shape[1], 2 ** (len(TOY_SD.vae.ch_mult) - 1)
    if crop > arr.shape[1] or crop % f:  # (a traceback steps later, after the run folder was made)
        raise SystemExit(f"--resolution {crop} must be a multiple of {f} no larger than the images' {arr.shape[1]} px "
                         "(0 = whole images).")
    torch.manual_seed(a.seed)
    device = sdm.pick_device(a.device)
    vae = sdm.AutoencoderKL(TOY_SD.vae).to(device)
    _, vision = _clip_towers(os.path.join(a.stage_dir, "clip"))
    vision.to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.learning_rate, weight_decay=0.0)

    def features(x):
        vm = vision.vision_model
        h, out = vm.pre_layrnorm(vm.embeddings(vision.preprocess(x))), []
        for layer in vm.encoder.layers:
            h = layer(h)
            out.append(F.normalize(h, dim=-1))
        return out

    def loss_fn(g):
        idx = torch.randint(0, len(arr), (a.train_batch_size,), generator=g)
        x = _pixels(arr, idx, device)
        top, left = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=g).tolist()
        x = x[..., top:top + crop, left:left + crop]
        dist = vae.encode(x)
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)  # CPU draws: one stream on any device
        rec = vae.decode(z)
        kl = 0.5 * (dist.mean**2 + dist.std**2 - 1 - dist.logvar).sum((1, 2, 3)).mean()
        l1 = (rec - x).abs().mean()
        perceptual = sum((f - r).square().sum(-1).mean() for f, r in zip(features(x), features(rec))) / len(vision.vision_model.encoder.layers)
        loss = l1 + (rec - x).square().mean() + a.perceptual_weight * perceptual + 1e-6 * kl
        return loss, {"l1": l1.item(), "perceptual": perceptual.item(), "kl": kl.item()}

    save = lambda folder: sdm.save_safetensors(vae.state_dict(), Path(folder) / "vae.safetensors")
    sdm.train_loop(a, opt, dict(vae.state_dict(keep_vars=True)), loss_fn, save,
                   torch.Generator().manual_seed(a.seed), device=device)


# The VAE weights the posterior moments come from: a decoder-only fine-tune (as SD's ft-MSE VAE was) leaves the cache valid.
LATENT_WEIGHTS = ("encoder.", "quant_conv.")


def latent_key(vae, arr, n: int) -> str:
    """What train-unet's latent cache is a function of: the VAE encoder's weights and every byte of the first n images
    (sha256 at about 2 GB/s: 0.2 s for the shipped 32k, against minutes to encode them)."""
    h = hashlib.sha256(json.dumps([n, *arr.shape[1:]]).encode())
    for k, v in sorted(vae.state_dict().items()):
        if k.startswith(LATENT_WEIGHTS):
            h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    h.update(np.ascontiguousarray(arr[:n]))  # a slice of the memory map is contiguous already: hashed as it is read
    return h.hexdigest()


def cached_latents(path, vae, arr, n: int) -> torch.Tensor:
    """The first n images' posterior moments from the cache at `path` when its key (latent_key) is this VAE's and these
    images'; otherwise encoded again and the cache rewritten (a stale cache is a cache to rebuild, not an error)."""
    key, found = latent_key(vae, arr, n), None
    if os.path.isfile(path):
        try:
            with safe_open(path, "pt") as f:
                found = (f.metadata() or {}).get("latent_key")
                if found == key:
                    return f.get_tensor("moments")
        except Exception:  # safetensors' own error type: a cut-off or foreign file is rebuilt like a stale one
            pass
        print(f"{path} holds the latents of another VAE or other images (key {found and found[:12]}, these "
              f"{key[:12]}); encoding them again.", file=sys.stderr)
    moments = latent_moments(vae, arr, n)
    sdm.save_safetensors({"moments": moments}, path, {"latent_key": key, "images": n})
    return moments


@torch.no_grad()
def latent_moments(vae, arr, n: int) -> torch.Tensor:
    """The VAE posterior's (mean, logvar) of the first n pretraining images, in fp16 on the CPU: train-unet's latent cache."""
    device = next(vae.parameters()).device
    return torch.cat([vae.quant_conv(vae.encoder(_pixels(arr, torch.arange(s, min(s + 256, n)), device))).half().cpu()
                      for s in tqdm(range(0, n, 256), desc="encode")])


def train_unet(a: ToyArgs):
    """The denoiser on frozen encoders (LDM Eq. 2): eps-MSE at uniform t, 10 % empty captions,
    an EMA of the weights (the EMA is what ships). Latents are encoded once and cached."""
    check_export(a.export)
    arr, captions = load_pretrain_data(a.data)
    torch.manual_seed(a.seed)
    device = sdm.pick_device(a.device)
    text, _ = _clip_towers(os.path.join(a.stage_dir, "clip"))
    vae_path = os.path.join(a.stage_dir, "vae", "vae.safetensors")
    vae = sdm.AutoencoderKL(TOY_SD.vae)
    vae.load_state_dict(_load(vae_path))
    resume_from = sdm.find_checkpoint(a.output_dir, a.resume)
    sdm.start_run(a.output_dir, a, resume_from, act=False)  # a folder train_loop would refuse: before minutes of encoding
    if resume_from and os.path.isfile(old := os.path.join(resume_from, "vae.safetensors")):  # each checkpoint holds its VAE
        trained = _load(old)
        if any(not torch.equal(v.to(trained[k].dtype), trained[k]) for k, v in vae.state_dict().items() if k.startswith(LATENT_WEIGHTS)):
            raise ValueError(f"'{resume_from}' was trained on the latents of another VAE than {vae_path}; resume with "
                             "that VAE (its vae.safetensors is in the checkpoint), or start a new --output-dir.")
    text.to(device).eval().requires_grad_(False), vae.to(device).eval().requires_grad_(False)
    n = min(a.latent_images or len(arr), len(arr))
    moments = cached_latents(os.path.join(a.stage_dir, f"latents-{n}.safetensors"), vae, arr, n)
    d = sdm.DiagonalGaussian(moments[:4096].float())
    # the latent scale (LDM Sec. 4.3.2: unit variance) from its own generator: a draw from the global one would make
    # the UNet's init below depend on whether the cache existed (and randn_like on the device's memory layout)
    z = d.mean + d.std * torch.randn(d.mean.shape, generator=torch.Generator().manual_seed(a.seed))
    scale = 1 / z.std().item()
    cfg = sdm.replace(TOY_SD, vae=sdm.replace(TOY_SD.vae, scale_factor=round(scale, 5)))
    tok = sdm.CLIPTokenizer()
    ids = tok(captions + [""])
    unet = sdm.UNetModel(cfg.unet).to(device)
    unet.gradient_checkpointing = a.gradient_checkpointing
    if a.channels_last:
        unet.to(memory_format=torch.channels_last)
    if a.compile:
        unet.compile()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    schedule = sdm.NoiseSchedule(cfg.schedule)
    opt = torch.optim.AdamW(unet.parameters(), lr=a.learning_rate, weight_decay=0.0)

    def loss_fn(g):  # every draw from the CPU generator, so a run's data and noise are the same on any device
        idx = torch.randint(0, n, (a.train_batch_size,), generator=g)
        drop = torch.rand(len(idx), generator=g) < 0.1
        with torch.no_grad():
            context = text(ids[torch.where(drop, len(captions), idx)].to(device))[0]
        z0 = sdm.DiagonalGaussian(moments[idx].float())
        z0 = ((z0.mean + z0.std * torch.randn(z0.mean.shape, generator=g)) * scale).to(device)
        t = torch.randint(0, 1000, (len(idx),), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        return F.mse_loss(unet(schedule.q_sample(z0, t, noise), t, context), noise), {}

    @torch.no_grad()
    def ema_update():
        for k, v in unet.state_dict().items():
            ema[k].lerp_(v, 1 - a.ema) if v.is_floating_point() else ema[k].copy_(v)

    image_encoder = _clip_towers(os.path.join(a.stage_dir, "clip"))[1].state_dict()
    parts = lambda: {"unet": ema, "vae": vae.state_dict(), "text_encoder": text.state_dict(),
                     "image_encoder": image_encoder}

    def validate():  # the EMA model, as it would ship
        model = sdm.StableDiffusion(cfg).to(device)
        for p, sd in parts().items():
            if p != "image_encoder":
                getattr(model, p).load_state_dict(sd)
        images = model.eval().sample([a.validation_prompt] * a.num_validation_images, steps=25,
                                     generator=torch.Generator().manual_seed(0), progress=False)
        return sdm.tensor_to_images(images)

    tensors = {**{f"unet.{k}": v for k, v in unet.state_dict(keep_vars=True).items()},
               **{f"ema.{k}": v for k, v in ema.items()}}
    save = lambda folder: save_toy(folder, parts(), cfg)
    # the export happens after the loop, so it stays out of the checkpoints' settings: a resume may export elsewhere (it was
    # refused whenever the two folders did not exist yet, as only existing paths are left out of the comparison)
    out = sdm.train_loop(sdm.replace(a, export=""), opt, tensors, loss_fn, save, torch.Generator().manual_seed(a.seed),
                         validate_fn=validate, after_step=ema_update, device=device, metadata={"export": a.export})
    if a.export:
        export_model(out, a.export)
        print(f"wrote the toy model to {a.export}")


@torch.no_grad()
def eval_base(model_dir=None, n=256, steps=25, guidance_scale=5.0, seed=123, out=None, batch=64, device=""):
    """Quality of a base model on prompts from the training vocabulary: render a fresh
    single-object scene's full description ("a small red striped star in the snow, in the top
    left"), generate, and ask the probes whether background, position, size, shape, colour and
    pattern came out as asked. Returns per-attribute accuracy (and the probes' own on the truth)."""
    probes, meta = load_probes(PROBES_PATH)
    model = sdm.StableDiffusion.from_pretrained(model_dir, device=sdm.pick_device(device))
    rng = np.random.default_rng((seed, 7))
    scenes = [sample_scene(rng, "pretrain", p_two=0.0) for _ in range(n)]
    prompts = [f"{object_phrase(s.objects[0], s.objects[0].shape)} {BG_PHRASE[s.background]}, "
               f"{POS_PHRASE[s.objects[0].position]}" for s in scenes]
    images = []
    for i in tqdm(range(0, n, batch), desc="generate"):
        x = model.sample(prompts[i:i + batch], steps=steps, guidance_scale=guidance_scale,
                         generator=torch.Generator().manual_seed(seed + i), progress=False)
        images += [np.asarray(im) for im in sdm.tensor_to_images(x)]
    keys = ("background", "position", "size", "shape", "color", "pattern")
    truth = [dict(background=s.background, **{k: getattr(s.objects[0], k) for k in keys[1:]}) for s in scenes]
    acc = lambda preds: {k: float(np.mean([p[k] == t[k] for p, t in zip(preds, truth)])) for k in keys}
    result = {"generated": acc(predict(probes, images)),
              "probes_on_truth": acc(predict(probes, [render(s)[0] for s in scenes])),
              "n": n, "steps": steps, "guidance_scale": guidance_scale}
    if out:
        os.makedirs(out, exist_ok=True)
        sdm.save_image(sdm.image_grid([Image.fromarray(im) for im in images[:32]], 8), os.path.join(out, "grid.png"))
        atomic_write(os.path.join(out, "eval_base.json"), json.dumps({**result, "prompts": prompts}, indent=1).encode())
    return result


def pretrain(work="outputs/toy", n=200_000, export=TOY_DIR, threads=2, device=""):
    """Every stage in order, each resumable and skipped once finished: data, CLIP, VAE, and the UNet in
    the shipped model's two phases (SHIPPED_UNET_STEPS); then the final checkpoint goes to `export`."""
    check_export(export)  # before the hours of the earlier stages
    torch.set_num_threads(threads)
    data = os.path.join(work, "data")
    if not os.path.isfile(os.path.join(data, "images.npy")):
        pretrain_data(data, n)
    common = dict(data=data, stage_dir=work, resume="latest", threads=threads, device=device)
    for name, cls, fn, done in (("clip", ClipArgs, train_clip, "text_encoder.safetensors"),
                                ("vae", VaeArgs, train_vae, "vae.safetensors")):
        a = cls(**common, output_dir=os.path.join(work, name))
        if not os.path.isfile(os.path.join(a.output_dir, done)):
            fn(a)
    # The phases export nothing and the end exports the final checkpoint: a stop in phase 2 leaves the old model in
    # `export`, never phase 1's, and a stop between the last checkpoint and the export is exported on the rerun. A phase
    # is done once a complete checkpoint (find_checkpoint's rule: its training state is written last) reaches its steps.
    unet = UnetArgs(**common, output_dir=os.path.join(work, "unet"), export="")
    for steps in SHIPPED_UNET_STEPS:
        latest = sdm.find_checkpoint(unet.output_dir, "latest")
        if latest is None or int(latest.name.split("-")[1]) < steps:
            train_unet(sdm.replace(unet, max_train_steps=steps))
    if export:  # the checkpoint, not the run folder, whose files a stop before the loop's final save leaves at phase 1
        export_model(os.path.join(unet.output_dir, f"checkpoint-{SHIPPED_UNET_STEPS[-1]}"), export)
        print(f"wrote the toy model to {export}")


# ----------------------------------------------------------------------------------------------
# 9. Command line

def read_manifest(path):
    if not os.path.isfile(path):
        raise SystemExit(f"No manifest at {path}; write one JSON object per line with "
                         "file, concept, prompt and method.")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"{path} line {i} is not JSON ({e}).")
            if not isinstance(r, dict) or "file" not in r or "prompt" not in r:
                raise SystemExit(f"{path} line {i} needs at least 'file' and 'prompt'.")
            r.setdefault("method", "unnamed")
            rows.append(r)
    return rows


# The flags every stage reads (train_loop's and ToyArgs'), and each stage's own; the shared training flags a stage does not
# read (--pretrained-model: the stages train from scratch; --resolution outside train-vae, --scale-lr, ...) are refused, not
# silently dropped.
LOOP_FLAGS = {"output_dir", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "learning_rate", "lr_scheduler",
              "lr_warmup_steps", "max_grad_norm", "seed", "mixed_precision", "checkpointing_steps", "checkpoints_total_limit",
              "resume", "device", "overwrite", "data", "threads"}
STAGES = {"train-clip": (ClipArgs, train_clip, {"hard_negatives"}),
          "train-vae": (VaeArgs, train_vae, {"stage_dir", "resolution", "perceptual_weight"}),
          "train-unet": (UnetArgs, train_unet, {"stage_dir", "gradient_checkpointing", "compile", "channels_last", "ema",
                                                "validation_prompt", "validation_steps", "num_validation_images",
                                                "latent_images", "export"})}


# The floor of every integer flag of the commands below (the training stages check theirs in sdm.parse_args).
# --seed as theirs: NumPy refuses a negative seed, but only once the output folder exists.
FLOORS = {"n": 1, "workers": 0, "threads": 1, "shard_size": 1, "n_refs": 1, "per_prompt": 1, "steps": 1, "n_train": 1, "seed": 0}


def main(argv=None):
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:  # FloatingPointError: a non-finite loss
        sys.exit(f"error: {e}")


def _main(argv):
    if argv and argv[0] in STAGES:  # training stages take the project's standard training flags
        cls, fn, reads = STAGES[argv[0]]
        a = sdm.parse_args(cls, argv[1:], argparse.ArgumentParser(prog=f"toy_world.py {argv[0]}",
                                                                  description=fn.__doc__))
        if unread := ["--" + f.name.replace("_", "-") for f in fields(cls)
                      if f.name not in LOOP_FLAGS | reads and getattr(a, f.name) != f.default]:
            sys.exit(f"toy_world.py {argv[0]} does not use {', '.join(unread)} (shared training flags outside its "
                     "recipe; --compile and --channels-last apply to train-unet, --resolution to train-vae); leave them out.")
        torch.set_num_threads(a.threads)
        return fn(a)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (_, fn, _) in STAGES.items():  # the docstring's first paragraph (its first line stops mid-sentence)
        sub.add_parser(name, help=" ".join(fn.__doc__.split("\n\n")[0].split()).replace("%", "%%") + " (--help: its flags)")
    c = sub.add_parser("init-sd", help="a toy-shaped model with random weights")
    c.add_argument("--out", required=True)
    c.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("pretrain-data", help="render the pretraining scenes once (images.npy + captions.json)")
    c.add_argument("--out", default="outputs/toy/data")
    c.add_argument("--n", type=int, default=200_000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=2, help="render processes (0: in this process)")
    c.add_argument("--overwrite", action="store_true", help="render again into a folder that holds data")
    c = sub.add_parser("pretrain", help="every stage: data, CLIP, VAE, UNet; rerun to resume")
    c.add_argument("--work", default="outputs/toy")
    c.add_argument("--n", type=int, default=200_000)
    c.add_argument("--export", default=TOY_DIR)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--device", default="", help="'' = cuda when available")
    c = sub.add_parser("eval-base", help="probe accuracy of a base model on training-vocabulary prompts")
    c.add_argument("--model", default=None, help="default: the toy model")
    c.add_argument("--n", type=int, default=256)
    c.add_argument("--steps", type=int, default=25)
    c.add_argument("--guidance-scale", type=float, default=5.0)
    c.add_argument("--out", default=None, help="folder for a sample grid and the JSON")
    c.add_argument("--device", default="", help="'' = cuda when available")
    gen = {}
    for name, help in (("make-data", "captioned images + captions.jsonl"),
                       ("make-records", "Subject-Diffusion records (folder or tar shards)"),
                       ("make-concepts", "reference images + concept.json per concept"),
                       ("make-oracle", "ground truth for every eval prompt + manifest.jsonl")):
        gen[name] = c = sub.add_parser(name, help=help)
        c.add_argument("--out", required=True, help="output folder")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--size", type=int, default=64, help="image side in pixels")
        c.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    gen["make-data"].add_argument("--n", type=int, required=True)
    gen["make-records"].add_argument("--n", type=int, required=True)
    gen["make-records"].add_argument("--shard-size", type=int, default=None,
                                     help="samples per tar shard (default: loose files)")
    gen["make-concepts"].add_argument("--n-refs", type=int, default=5)
    gen["make-oracle"].add_argument("--per-prompt", type=int, default=2)
    c = sub.add_parser("train-probes", help="train the attribute probes on fresh renders")
    c.add_argument("--out", default=PROBES_PATH, help="the .safetensors file to write")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--steps", type=int, default=3500)
    c.add_argument("--n-train", type=int, default=24000, help="rendered training images")
    c.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("eval", help="score generated images listed in a manifest")
    c.add_argument("--images", required=True, help="folder with the images and manifest.jsonl")
    c.add_argument("--manifest", default=None, help="default: IMAGES/manifest.jsonl")
    c.add_argument("--concept", default=None, help="only this concept (id or make-concepts folder)")
    c.add_argument("--probes", default=PROBES_PATH)
    c.add_argument("--clip-model", default="", help="model folder with the toy CLIP (default: the "
                   "toy model, when it exists; 'none' skips CLIP-T / CLIP-I)")
    c.add_argument("--out", default=None, help="results JSON (default: IMAGES/eval_results.json)")
    a = p.parse_args(argv)
    if getattr(a, "size", 64) < 32:
        raise SystemExit("--size must be at least 32: below that small objects vanish.")
    for flag, floor in FLOORS.items():  # before anything is written: --n 0 wrote empty files, --threads 0 a traceback
        if (v := getattr(a, flag, None)) is not None and v < floor:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least {floor} (got {v}).")

    if a.cmd == "init-sd":
        init_sd(a.out, a.seed)
    elif a.cmd == "pretrain-data":
        pretrain_data(a.out, a.n, a.seed, workers=a.workers, overwrite=a.overwrite)
    elif a.cmd == "pretrain":
        pretrain(a.work, a.n, a.export, a.threads, a.device)
    elif a.cmd == "eval-base":
        r = eval_base(a.model, a.n, a.steps, a.guidance_scale, out=a.out, device=a.device)
        print("| attribute | generated | probes on the truth |\n|---|---|---|")
        print("\n".join(f"| {k} | {v:.3f} | {r['probes_on_truth'][k]:.3f} |" for k, v in r["generated"].items()))
    elif a.cmd == "make-data":
        make_data(a.out, a.n, a.seed, a.size, a.overwrite)
    elif a.cmd == "make-records":
        make_records(a.out, a.n, a.seed, a.size, a.shard_size, a.overwrite)
    elif a.cmd == "make-concepts":
        make_concepts(a.out, a.n_refs, a.size, a.seed, a.overwrite)
    elif a.cmd == "make-oracle":
        make_oracle(a.out, a.per_prompt, a.size, a.seed, a.overwrite)
    elif a.cmd == "train-probes":
        torch.set_num_threads(a.threads)
        t0 = time.time()
        train_probes(a.out, a.steps, n_train=a.n_train, seed=a.seed)
        print(f"wrote {a.out} in {time.time() - t0:.0f} s")
    elif a.cmd == "eval":
        model, _ = load_probes(a.probes)
        concept = find_concept(a.concept) if a.concept else None
        manifest = read_manifest(a.manifest or os.path.join(a.images, "manifest.jsonl"))
        clip_dir = a.clip_model or (TOY_DIR if os.path.isfile(os.path.join(TOY_DIR, "config.json")) else "none")
        clip = None if clip_dir == "none" else ToyCLIP(clip_dir)
        results = evaluate(a.images, manifest, model, concept, clip)
        print(markdown_table(results))
        out = a.out or os.path.join(a.images, "eval_results.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic_write(out, json.dumps(results, indent=1).encode())
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
