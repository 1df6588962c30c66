"""`dyvte build` bookkeeping on CPU, with a stand-in for the tensorrt module: resume after an
interruption, a loadable folder after every plan, corrupt or foreign timing caches, rebuilds
with other limits. (That every TensorRT name the code uses exists in the real 10.x/11.x
bindings is checked by test_tensorrt_api.py; real builds by test_tensorrt.py on a GPU.)"""

import hashlib
import json

import pytest

from conftest import copy_engine


class FakeTensorRT:
    """The part of the TensorRT Python API dyvte's builder calls, with deterministic plans."""

    __version__ = "10.13.3.9"

    def __init__(self):
        self.built, self.fail_on, self.notes = [], None, []
        trt = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 0

        class MemoryPoolType:
            WORKSPACE = 0

        class Network:
            def __init__(self):
                self.path = None

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                self.network.path = path
                return True

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class TimingCache:
            def __init__(self, blob):
                self.blob = blob

            def serialize(self):
                return b"cache:" + self.blob[-8:]

        class Config:
            def __init__(self):
                self.profiles, self.cache = [], None

            def set_memory_pool_limit(self, pool, size):
                pass

            def create_timing_cache(self, blob):
                if blob.startswith(b"corrupt"):
                    raise RuntimeError("cannot deserialize the timing cache")
                return TimingCache(bytes(blob))

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.blob.startswith(b"foreign"):
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, prof):
                self.profiles.append(prof)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                name = network.path.rsplit("/", 1)[-1].removesuffix(".onnx")
                if name == trt.fail_on:
                    raise KeyboardInterrupt  # the user stops the build
                assert config.cache is not None
                trt.built.append(name)
                return json.dumps([name, [p.shapes for p in config.profiles]]).encode()

        class Engine:
            def __init__(self, blob):
                self.n = len(json.loads(blob)[1])

            def get_device_memory_size_for_profile_v2(self, i):
                assert i < self.n
                return 1024 * (i + 1)

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                return Engine(bytes(blob))

        for cls in (Logger, NetworkDefinitionCreationFlag, MemoryPoolType, OnnxParser, Builder, Runtime):
            setattr(self, cls.__name__, cls)


@pytest.fixture
def fake_trt(monkeypatch):
    import dyvte.engines.tensorrt as T

    trt = FakeTensorRT()
    monkeypatch.setattr(T, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(T, "_device", lambda: "Fake GPU (sm_90)")
    return trt


def _build(folder, **kw):
    from dyvte.engines.tensorrt import BuildSettings, build_engines

    notes = []
    report = build_engines(BuildSettings(folder, progress=False, log=notes.append, **kw))
    return report, notes


def test_interrupted_build_stays_loadable_and_resumes(llama, tmp_path, fake_trt):
    from dyvte import features
    from dyvte.engines.manifest import Manifest

    folder = copy_engine(llama.engine_dir, tmp_path)
    fake_trt.fail_on = "segment_1"
    with pytest.raises(KeyboardInterrupt):
        _build(folder)
    m = Manifest.load(folder)  # every checksum matches: loadable after the interruption
    trt = m.data["engines"]["tensorrt"]
    assert trt["complete"] is False and set(trt["parts"]) == {"vision", "embed", "segment_0"}
    assert features.built_engines(m) == []  # backend "auto" does not pick an unfinished build
    assert all(m.path(p["plan"]).is_file() for p in trt["parts"].values())
    fake_trt.fail_on, done = None, list(fake_trt.built)
    report, _ = _build(folder)
    assert fake_trt.built[len(done):] == [n for n in m.parts if n not in done]  # only the rest was built
    m = Manifest.load(folder)
    assert m.data["engines"]["tensorrt"]["complete"] is True and features.built_engines(m) == ["tensorrt"]
    assert set(report["engines"]) == set(m.parts)
    for name, p in m.data["engines"]["tensorrt"]["parts"].items():
        assert p["profiles"] == (["full", "text", "decode"] if name.startswith("segment_") else ["default"])
        assert m.data["files"][p["plan"]]["sha256"] == hashlib.sha256(m.path(p["plan"]).read_bytes()).hexdigest()
    n = len(fake_trt.built)
    _build(folder)  # nothing left to do
    assert len(fake_trt.built) == n


def test_rebuild_with_other_limits_replaces_plans(llama, tmp_path, fake_trt):
    from dyvte.engines.manifest import Manifest

    folder = copy_engine(llama.engine_dir, tmp_path)
    _build(folder)
    old = {p["plan"] for p in Manifest.load(folder).data["engines"]["tensorrt"]["parts"].values()}
    _build(folder, max_batch=2, max_input_len=128)
    m = Manifest.load(folder)
    new = {p["plan"] for p in m.data["engines"]["tensorrt"]["parts"].values()}
    assert m.data["engines"]["tensorrt"]["limits"]["max_batch"] == 2
    assert not old & new  # every profile changed
    assert not any((folder / p).exists() for p in old)  # stale plans deleted once unreferenced
    assert sorted(p.name for p in (folder / "trt").glob("*.plan")) == sorted(p.split("/")[-1] for p in new)


@pytest.mark.parametrize("content", [b"corrupt bytes", b"foreign cache from another GPU"])
def test_bad_timing_cache_starts_afresh(llama, tmp_path, fake_trt, content):
    folder = copy_engine(llama.engine_dir, tmp_path)
    (folder / "trt").mkdir()
    (folder / "trt" / "timing.cache").write_bytes(content)
    report, notes = _build(folder)
    assert set(report["engines"]) >= {"vision", "segment_0"}
    assert any("starting a new timing cache" in n for n in notes)
    assert (folder / "trt" / "timing.cache").read_bytes().startswith(b"cache:")


def test_runner_limits_are_the_build_limits(llama, tmp_path, fake_trt):
    """Requests are checked against the limits the plans were built with, not the export's."""
    from dyvte.engines.manifest import Manifest
    from dyvte.runtime.backends.tensorrt import TensorRTRunner

    folder = copy_engine(llama.engine_dir, tmp_path)
    _build(folder, max_batch=2, max_input_len=100, max_new_tokens=8)
    runner = TensorRTRunner.__new__(TensorRTRunner)  # the real one needs a GPU; limits need none
    runner.manifest = Manifest.load(folder)
    assert runner.limits == {"max_batch": 2, "max_input_len": 100, "max_new_tokens": 8}


def test_pipeline_checks_the_runners_limits(llama, pipelines):
    from conftest import make_image
    from dyvte.errors import InputError
    from dyvte.runtime.pipeline import Pipeline

    base = pipelines(llama.engine_dir)

    class Narrow:  # a runner whose engines take shorter prompts than the export
        def __init__(self, runner):
            self._r = runner

        def __getattr__(self, name):
            return getattr(self._r, name)

        limits = {"max_batch": 1, "max_input_len": 20, "max_new_tokens": 4}

    pipe = Pipeline(base.manifest, Narrow(base.runner), base.processor)
    with pytest.raises(InputError, match="at most 20 with backend onnxruntime"):
        pipe.generate(make_image(0), "what color ?", max_new_tokens=2)
    with pytest.raises(InputError, match=r"max_new_tokens must be in \[1, 4\]"):
        pipe.generate(make_image(0), "what color ?", max_new_tokens=5)
