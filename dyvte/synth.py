"""Synthetic visual question answering, deterministic from a seed.

Scenes: 96x96 images, a 6x6 grid of 16-px cells holding 1-6 coloured shapes and, in about
half of them, a three-letter word. Questions cannot be answered without the image; answers are one word. Question types
differ in how much visual work they need (one attribute lookup, a conjunction, a count, a
position, reading text), like the benchmarks the paper compares exit layers on.

Sample ``i`` of seed ``s`` depends only on (s, i), so a held-out set from another seed is
disjoint in distribution-free terms and any prefix of a set is reproducible. Written in LLaVA's
format: ``data.json`` (a list of {id, image, conversations: [human, gpt], type, answer}) and
``images/*.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 195, 30),
    "purple": (145, 55, 185),
}
SHAPES = ("circle", "square", "triangle", "cross")
WORDS = ("cat", "dog", "sun", "box", "pen", "key")  # no two share a 2-letter window
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "exist", "count", "position", "text")
IMAGE_SIZE, GRID = 96, 6
DATA_VERSION = 2  # bump when images or questions change: names the demo-split cache folders
CELL = IMAGE_SIZE // GRID

#: Demo seeds: training data, held-out evaluation, VTW calibration.
TRAIN_SEED, HELDOUT_SEED, CALIB_SEED = 0, 1, 2


def vocabulary() -> list[str]:
    """Every word questions and answers use (the demo tokenizer's vocabulary)."""
    words = ["what", "color", "is", "the", "shape", "object", "are", "there", "a", "how", "many", "objects",
             "on", "left", "or", "right", "word", "written", "yes", "no", "in", "image"]
    return list(dict.fromkeys([*words, *COLORS, *SHAPES, *WORDS, *NUMBERS]))


@dataclass
class Obj:
    shape: str
    color: str
    row: int
    col: int


@dataclass
class Sample:
    image: object  # PIL.Image
    question: str
    answer: str
    qtype: str
    objects: list  # list[Obj]
    word: tuple | None = None  # (text, row, x0, x1) when the scene shows a word

    def cell_labels(self):
        """Per grid cell (row-major): (colour index + 1, shape index + 1, word index + 1), 0 = none."""
        colors, shapes = list(COLORS), list(SHAPES)
        labels = [[0, 0, 0] for _ in range(GRID * GRID)]
        for o in self.objects:
            labels[o.row * GRID + o.col][:2] = [colors.index(o.color) + 1, shapes.index(o.shape) + 1]
        if self.word:
            text, row, x0, x1 = self.word
            for c in range(GRID):
                if x0 < (c + 1) * CELL and x1 > c * CELL:
                    labels[row * GRID + c][2] = WORDS.index(text) + 1
        return labels


def _draw(objs: list[Obj], word, rng):
    from PIL import Image, ImageDraw, ImageFont

    bg = int(rng.integers(225, 250))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    for o in objs:
        s = int(rng.integers(11, 15))
        cx = o.col * CELL + CELL // 2 + int(rng.integers(-1, 2))
        cy = o.row * CELL + CELL // 2 + int(rng.integers(-1, 2))
        x0, y0, x1, y1 = cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2
        c = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=c)
        elif o.shape == "square":
            d.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=c)
        elif o.shape == "triangle":
            d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=c)
        else:  # cross
            w = max(3, s // 3)
            d.rectangle((cx - w // 2, y0, cx + w // 2, y1), fill=c)
            d.rectangle((x0, cy - w // 2, x1, cy + w // 2), fill=c)
    placed = None
    if word is not None:
        text, row = word
        font = ImageFont.load_default(size=15)
        # starts near a cell boundary and spans two cells, so the patches show few distinct glyph pieces
        x = int(rng.integers(GRID - 1)) * CELL + int(rng.integers(0, 3))
        d.text((x, row * CELL - 3), text, fill=(20, 20, 20), font=font)
        placed = (text, row, x, x + int(d.textlength(text, font=font)))
    return img, placed


def _scene(rng, n_min=2, n_max=6, rows=range(GRID)):
    n = int(rng.integers(n_min, n_max + 1))
    cells = [(r, c) for r in rows for c in range(GRID)]
    picks = rng.choice(len(cells), size=n, replace=False)
    return [Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), *cells[i]) for i in picks]


def _ask(rng, qtype: str, objs: list[Obj], word):
    """A (question, answer) of ``qtype`` about a scene, or None when the scene cannot pose it."""
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    if qtype == "text":
        return ("what word is written in the image ?", word[0]) if word else None
    if qtype == "color":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if unique:
            s = str(rng.choice(unique))
            return f"what color is the {s} ?", objs[shapes.index(s)].color
    elif qtype == "shape":
        unique = [c for c in COLORS if colors.count(c) == 1]
        if unique:
            c = str(rng.choice(unique))
            return f"what shape is the {c} object ?", objs[colors.index(c)].shape
    elif qtype == "exist":
        if rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            return f"is there a {o.color} {o.shape} ?", "yes"
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in set(zip(colors, shapes))]
        c, s = absent[int(rng.integers(len(absent)))]
        return f"is there a {c} {s} ?", "no"
    elif qtype == "count":
        present = [s for s in SHAPES if 1 <= shapes.count(s) <= 4]
        if present:
            s = str(rng.choice(present))
            return f"how many {s} objects are there ?", NUMBERS[shapes.count(s)]
    elif qtype == "position":
        pairs = list(zip(colors, shapes))
        unique = [o for o, p in zip(objs, pairs) if pairs.count(p) == 1]
        if unique:
            o = unique[int(rng.integers(len(unique)))]
            return f"is the {o.color} {o.shape} on the left or the right ?", "left" if o.col < GRID // 2 else "right"
    return None


#: Share of non-counting scenes that also show a word (a distractor, or a follow-up question).
WORD_RATE = 0.4


def _scene_for(rng, qtype: str):
    """A scene built for ``qtype``: always a word for text questions (often one elsewhere too),
    1-4 same-shape objects for counts."""
    if qtype == "text" or (qtype != "count" and rng.random() < WORD_RATE):
        row = int(rng.integers(GRID))
        return _scene(rng, 1, 5, rows=[r for r in range(GRID) if r != row]), (str(rng.choice(WORDS)), row)
    if qtype == "count":  # answers 1-4 equally likely, plus 0-2 distractors of other shapes
        s, n = str(rng.choice(SHAPES)), int(rng.integers(1, 5))
        others = [x for x in SHAPES if x != s]
        objs = _scene(rng, n + int(rng.integers(0, 3)), n + 2)[: n + 2]
        for j, o in enumerate(objs):
            o.shape = s if j < n else str(rng.choice(others))
        return objs, None
    return _scene(rng), None


def make_sample(seed: int, index: int) -> Sample:
    """Sample ``index`` of the set generated from ``seed`` (pure function of both)."""
    return make_dialogue(seed, index, 1)[0]


def make_dialogue(seed: int, index: int, turns: int) -> list[Sample]:
    """Up to ``turns`` questions about one scene (one image); the first is ``make_sample``'s."""
    import numpy as np

    rng = np.random.default_rng([seed, index])
    qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    for _ in range(100):
        objs, word = _scene_for(rng, qtype)
        qa = _ask(rng, qtype, objs, word) if qtype != "count" else (
            f"how many {objs[0].shape} objects are there ?", NUMBERS[[o.shape for o in objs].count(objs[0].shape)])
        if qa:
            break
    img, placed = _draw(objs, word, rng)
    out = [Sample(img, *qa, qtype, objs, placed)]
    more = np.random.default_rng([seed, index, 1])  # follow-ups never change the first question
    for t in more.permutation(QUESTION_TYPES).tolist():
        if len(out) >= turns:
            break
        if t == qtype:
            continue
        qa = _ask(more, t, objs, placed)
        if qa:
            out.append(Sample(img, *qa, t, objs, placed))
    return out


def write_dataset(out: str | Path, num: int, seed: int, progress: bool = True) -> Path:
    """Write ``num`` samples of ``seed`` as LLaVA-format JSON + PNGs; returns the JSON path."""
    from tqdm.auto import tqdm

    from dyvte.engines.files import write_json

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(num), desc="synth", unit="img", disable=not progress):
        s = make_sample(seed, i)
        rel = f"images/{seed}_{i:06d}.png"
        s.image.save(out / rel)
        records.append({
            "id": f"synth-{seed}-{i}",
            "image": rel,
            "conversations": [{"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}],
            "type": s.qtype,
        })
    path = out / "data.json"
    write_json(path, records)
    return path


def demo_split(name: str, num: int, cache: Path | None = None) -> tuple[Path, Path]:
    """(data.json, image root) of a demo split (``heldout`` or ``calib``), generated once and cached."""
    import os

    seed = {"heldout": HELDOUT_SEED, "calib": CALIB_SEED, "train": TRAIN_SEED}[name]
    root = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dyvte" / "synth"
    folder = root / f"{name}-v{DATA_VERSION}-seed{seed}-n{num}"
    path = folder / "data.json"
    if not path.is_file():
        write_dataset(folder, num, seed, progress=False)
    return path, folder


def load_records(path: str | Path) -> list[dict]:
    from dyvte.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset {path} not found; pass a LLaVA-format JSON file (make one with `dyvte synth-data`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"dataset {path} is not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise InputError(f"dataset {path} must hold a JSON list of LLaVA records")
    return data
