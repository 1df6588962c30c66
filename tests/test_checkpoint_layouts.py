"""Checkpoint folders in the file layouts published checkpoints come in (issue 17): with and without
processor_config.json, the chat template in chat_template.json, chat_template.jinja or
tokenizer_config.json, loaded without torchvision. Every family's processor encodes as the one of the
folder transformers 5 saves, also after the engine folder's save; Qwen-VL folders without a processor
config export to the same engines; broken folders give one line naming the file."""

import json
import shutil

import pytest
import torch

from conftest import MODELS, make_image
from dyvte.errors import ModelNotFoundError
from dyvte.tiny import LAYOUTS, Layout, TinyLlavaSpec, build_tiny_llava, write_layout

SPECS = {"llava": "llama_gqa", "llava_next": "llava_next", "internvl": "internvl", "qwen2_vl": "qwen2_vl",
         "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl",
         "gemma3": "gemma3"}  # family -> its tiny fixture in conftest.MODELS
QUESTION = "what color is the circle ?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Checkpoint folder of a family in a layout (same weights in every layout), built once."""
    root, cache = tmp_path_factory.mktemp("layouts"), {}

    def get(family: str, layout: str = "saved"):
        if (family, layout) not in cache:
            if layout == "saved":
                spec = TinyLlavaSpec(**MODELS[SPECS[family]][0])
                cache[family, layout] = build_tiny_llava(spec, root / f"{family}-{layout}", seed=1)
            else:  # the saved folder rewritten into the layout (what build_tiny_llava(layout=...) does)
                path = shutil.copytree(get(family), root / f"{family}-{layout}")
                write_layout(path, LAYOUTS[layout])
                cache[family, layout] = path
        return cache[family, layout]

    return get


def _encode(processor, seed=0):
    from dyvte.runtime.inputs import encode

    return encode(processor, make_image(seed, (40, 52)), QUESTION)


def _assert_same(got, want):
    (ids, vision), (ref_ids, ref_vision) = got, want
    assert torch.equal(ids, ref_ids) and vision.keys() == ref_vision.keys()
    assert all(torch.equal(vision[k], ref_vision[k]) for k in vision)


def test_layouts_hold_exactly_their_files(folder):
    common = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}

    def files(family, layout):
        return {p.name for p in folder(family, layout).iterdir()} - common

    assert files("llava", "llava-hf") == {"processor_config.json", "preprocessor_config.json", "chat_template.json"}
    assert files("qwen2_5_vl", "qwen2.5-vl") == {"preprocessor_config.json", "chat_template.json"}
    assert files("qwen2_vl", "qwen2-vl-early") == {"preprocessor_config.json"}
    assert files("internvl", "internvl3-hf") == {"processor_config.json", "preprocessor_config.json",
                                                 "chat_template.jinja", "video_preprocessor_config.json"}
    qwen = folder("qwen2_5_vl", "qwen2.5-vl")
    assert "chat_template" in json.loads((qwen / "tokenizer_config.json").read_text())
    assert {"min_pixels", "max_pixels"} <= set(json.loads((qwen / "preprocessor_config.json").read_text()))
    proc = json.loads((folder("llava", "llava-hf") / "processor_config.json").read_text())
    assert "image_processor" not in proc and proc["patch_size"] == 6
    assert files("qwen3_vl", "qwen3-vl") == {"preprocessor_config.json", "video_preprocessor_config.json",
                                             "chat_template.json"}  # Qwen/Qwen3-VL-*-Instruct
    image = json.loads((folder("qwen3_vl", "qwen3-vl") / "preprocessor_config.json").read_text())
    assert image["image_processor_type"] == "Qwen2VLImageProcessorFast" and "longest_edge" in image["size"]
    assert files("gemma3", "gemma-3") == {"processor_config.json", "preprocessor_config.json", "chat_template.json"}
    proc = json.loads((folder("gemma3", "gemma-3") / "processor_config.json").read_text())
    assert proc == {"image_seq_length": 16, "processor_class": "Gemma3Processor"}  # google/gemma-3-*-it's keys
    assert files("gemma3", "none-jinja") == {"preprocessor_config.json", "chat_template.jinja"}  # image_seq_length: config


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "saved"])
@pytest.mark.parametrize("family", list(SPECS))
def test_every_layout_loads_and_encodes_as_saved(folder, family, layout, tmp_path):
    """The processor of each layout gives the saved folder's ids and image tensors, and so does its
    copy in an engine folder (what the runtime loads)."""
    from dyvte.families import family_named
    from dyvte.models import load_processor

    want = _encode(load_processor(folder(family)))
    processor = load_processor(folder(family, layout))
    _assert_same(_encode(processor), want)
    fam = family_named(family)
    fam.save_processor(processor, tmp_path)
    _assert_same(_encode(load_processor(tmp_path, fam)), want)


@pytest.mark.parametrize("family,hub", [("qwen2_vl", "qwen2.5-vl"), ("qwen2_5_vl", "qwen2.5-vl"),
                                        ("qwen3_vl", "qwen3-vl")])
def test_qwen_without_processor_config_exports_the_same_engines(folder, family, hub, tmp_path):
    """Qwen/Qwen2.5-VL-*-Instruct's (Qwen/Qwen3-VL-*-Instruct's) file set exports the saved folder's
    engine folder (every file the same) and generates its tokens."""
    from dyvte.exporter import ExportSettings, export
    from dyvte.runtime import Pipeline

    tokens, files = [], []
    for layout in ("saved", hub):
        out = export(ExportSettings(out=tmp_path / layout, model=str(folder(family, layout)), candidates=[2],
                                    max_input_len=128, max_new_tokens=8, progress=False))
        files.append(json.loads((out / "manifest.json").read_text())["files"])
        with Pipeline.load(out, backend="onnxruntime") as pipe:
            tokens.append(pipe.generate(make_image(0, (40, 52)), QUESTION, max_new_tokens=6, policy="never").token_ids)
    assert files[0] == files[1] and any(name.startswith("processor/") for name in files[0])
    assert tokens[0] == tokens[1] and len(tokens[0]) > 0


def _no_template(path):
    (path / "chat_template.json").unlink()
    tok = json.loads((path / "tokenizer_config.json").read_text())
    del tok["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(tok))


BROKEN = {  # how a Qwen2.5-VL folder is broken -> what the one line says
    "no chat template": (_no_template, r"has no chat template \(chat_template.jinja, chat_template.json or "
                                       r"\"chat_template\" in tokenizer_config.json\).*copy"),
    "corrupt preprocessor_config.json": (lambda p: (p / "preprocessor_config.json").write_text('{"min_pixels": 3'),
                                         r"preprocessor_config.json is not valid JSON .*restore it"),
    "no preprocessor_config.json": (lambda p: (p / "preprocessor_config.json").unlink(),
                                    r"has no preprocessor_config.json .*copy it"),
    "corrupt tokenizer.json": (lambda p: (p / "tokenizer.json").write_text("{"), r"tokenizer.json is not valid JSON"),
    "chat_template.json without its template": (lambda p: (p / "chat_template.json").write_text("{}"),
                                                r"chat_template.json has no \"chat_template\" string"),
    "unknown image processor": (lambda p: (p / "preprocessor_config.json").write_text('{"image_processor_type": "X"}'),
                                r"cannot load the processor/tokenizer from .*: .*preprocessor_config.json.*; the "
                                r"folder needs"),  # what transformers refuses, after the image-only fallback
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_folders_are_one_line(folder, broken, tmp_path):
    from click.testing import CliRunner

    from dyvte.cli import export_main
    from dyvte.models import load_processor

    model = shutil.copytree(folder("qwen2_5_vl", "qwen2.5-vl"), tmp_path / "model")
    mutate, match = BROKEN[broken]
    mutate(model)
    with pytest.raises(ModelNotFoundError, match=match) as err:
        load_processor(model)
    assert str(model) in str(err.value) and "\n" not in str(err.value)
    out = tmp_path / "engine"
    res = CliRunner().invoke(export_main, ["--model", str(model), "--out", str(out)])
    assert res.exit_code == 1 and res.output.strip() == f"error: {err.value}"
    assert not out.exists() and not out.with_name("engine.partial").exists()


def test_no_template_in_layout_is_refused(tmp_path):
    """A folder written with no template at all (Layout(chat_template=())) for a LLaVA family."""
    from dyvte.models import load_processor

    spec = TinyLlavaSpec(**MODELS["llava_next"][0])
    model = build_tiny_llava(spec, tmp_path / "m", seed=1, layout=Layout("separate", ()))
    with pytest.raises(ModelNotFoundError, match="has no chat template"):
        load_processor(model)
