"""The synthetic visual-QA generator: deterministic, LLaVA format, image-dependent answers."""

import json
from collections import Counter

from dyvte.synth import QUESTION_TYPES, make_sample, vocabulary, write_dataset


def test_deterministic_per_seed_and_index():
    a, b = make_sample(3, 17), make_sample(3, 17)
    assert (a.question, a.answer, a.qtype) == (b.question, b.answer, b.qtype)
    assert a.image.tobytes() == b.image.tobytes()
    others = [make_sample(4, i) for i in range(20)]
    assert any(o.image.tobytes() != make_sample(3, i).image.tobytes() for i, o in enumerate(others))


def test_types_and_answers_are_balanced():
    samples = [make_sample(0, i) for i in range(1200)]
    types = Counter(s.qtype for s in samples)
    assert set(types) == set(QUESTION_TYPES)
    assert min(types.values()) > 120
    for t in QUESTION_TYPES:  # no answer dominates a type: text alone cannot solve it
        answers = Counter(s.answer for s in samples if s.qtype == t)
        assert max(answers.values()) / sum(answers.values()) < 0.6, (t, answers)
    vocab = set(vocabulary())
    for s in samples[:200]:
        assert set(s.question.split()) - {"?"} <= vocab and s.answer in vocab


def test_same_question_different_images_different_answers():
    by_q = {}
    for i in range(600):
        s = make_sample(0, i)
        by_q.setdefault(s.question, set()).add(s.answer)
    assert sum(len(a) > 1 for a in by_q.values()) > 10


def test_llava_format_on_disk(tmp_path):
    from PIL import Image

    path = write_dataset(tmp_path / "d", 12, seed=5, progress=False)
    data = json.loads(path.read_text())
    assert len(data) == 12
    r = data[0]
    assert r["conversations"][0]["from"] == "human" and r["conversations"][0]["value"].startswith("<image>\n")
    assert r["conversations"][1]["from"] == "gpt"
    img = Image.open(tmp_path / "d" / r["image"])
    assert img.size == (96, 96)
    assert r["conversations"][1]["value"] == make_sample(5, 0).answer


def test_cli(tmp_path):
    from click.testing import CliRunner

    from dyvte.cli import main

    res = CliRunner().invoke(main, ["synth-data", "--out", str(tmp_path / "s"), "--num", "5", "--seed", "9"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "s" / "data.json").read_text())) == 5
