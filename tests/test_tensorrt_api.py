"""Every TensorRT attribute dyvte uses exists in every stored TensorRT release (no TensorRT, GPU or network).

engines/data/tensorrt_api/<version>.json hold the Python API of TensorRT releases, read from the bindings
wheels by scripts/trt_api_names.py (classes and enums with their members, the module's names, base classes).
The TensorRT code (SOURCES) is parsed with ``ast`` here, at test time, and every use is collected:

* ``trt.X``, ``trt.X.Y`` (enum values, class attributes), ``trt.X.Y.Z`` for nested types, also via ``self.trt``;
* ``obj.name`` (calls, properties, assignments) where ``obj`` is a TensorRT object: which variable holds which
  TensorRT class is stated in VARIABLES, per file. The mapping cannot go stale silently: a variable assigned
  from an expression on a TensorRT object or on the module (``x = engine.foo()``, ``x = trt.Bar(...)``,
  ``for x in <TensorRT objects>``) must be in it, and so must anything assigned the module itself.

A name used only behind ``hasattr(obj, "name")`` (the guarded branch) or through ``getattr(obj, "name",
default)`` may be missing; the other branch of ``if hasattr(obj, "name")`` only runs where the name is
missing, so what it uses is required only in those versions. Everything else must exist in all versions.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "engines" / "data" / "tensorrt_api"
SOURCES = ["engines/tensorrt.py", "runtime/backends/tensorrt.py"]
MODULE = "<module>"

# names that hold the tensorrt module, per file
MODULE_NAMES = {
    "engines/tensorrt.py": {"trt", "tensorrt"},
    "runtime/backends/tensorrt.py": {"trt", "self.trt"},
}
# expression key -> TensorRT class of what it holds, or None for a TensorRT value whose attributes are not used
# (a string, a container, an enum value). Keys: `name`, `self.attr`, `x[]` for an item of x, `x()` for a call.
VARIABLES = {
    "engines/tensorrt.py": {
        "logger": "Logger",
        "runtime": "Runtime",
        "builder": "Builder",
        "network": "INetworkDefinition",
        "parser": "OnnxParser",
        "config": "IBuilderConfig",
        "prof": "IOptimizationProfile",
        "cache": "ITimingCache",
        "timing": "ITimingCache",
        "blob": "IHostMemory",
        "engine": "ICudaEngine",
    },
    "runtime/backends/tensorrt.py": {
        "self.logger": "Logger",
        "runtime": "Runtime",
        "engine": "ICudaEngine",
        "self.engines[]": "ICudaEngine",
        "ctx": "IExecutionContext",
        "ctxs[]": "IExecutionContext",
        "self.contexts[][]": "IExecutionContext",
        "strategy": None,  # an ExecutionContextAllocationStrategy value
        "name": None,  # engine.get_tensor_name(i)
    },
}
# functions whose result is the tensorrt module
MODULE_FACTORIES = {"import_tensorrt"}


# -- the stored API ----------------------------------------------------------------------------------------
def _load_versions() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(API_DIR.glob("*.json"))}


VERSIONS = _load_versions()


def _members(api: dict, cls: str) -> set:
    """Attributes of a class: its own, its bases' (pybind11 inheritance) and, for an enum, its values."""
    out, todo, seen = set(), [cls], set()
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        out |= set(api["classes"].get(c, ()))
        out |= set(api.get("enums", {}).get(c, ()))
        todo += api.get("bases", {}).get(c, [])
    return out


def _exists(api: dict, cls: str, name: str) -> bool:
    if cls == MODULE:
        return name in api["module"]
    return cls in api["classes"] and name in _members(api, cls)


# -- reading the sources -----------------------------------------------------------------------------------
def _key(node) -> str | None:
    """'engine', 'self.engines[]', 'engine.get_tensor_name()', 'trt.Logger.WARNING'; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _key(node.value)
        if inner is None:
            return None
        return f"{inner}.{node.attr}"
    if isinstance(node, ast.Subscript):
        inner = _key(node.value)
        return f"{inner}[]" if inner is not None else None
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute) and node.func.attr == "values" and not node.args:
            return _key(node.func.value)  # d.values(): iterating it gives d[]
        inner = _key(node.func)
        return f"{inner}()" if inner is not None else None
    return None


def _prefixes(key: str) -> list[str]:
    """'a.b[]()' -> ['a', 'a.b', 'a.b[]', 'a.b[]()'] (longest last)."""
    out, i = [], 0
    while i < len(key):
        j = i
        while j < len(key) and key[j] not in ".[(":
            j += 1
        if j > i:
            out.append(key[:j])
        if j < len(key):
            close = {"[": "]", "(": ")"}.get(key[j])
            j = key.index(close, j) + 1 if close else j + 1
            if close:
                out.append(key[:j])
        i = j
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Use:
    file: str
    line: int
    cls: str  # MODULE for a module attribute
    name: str
    optional: bool = False  # behind a hasattr guard or a getattr default
    unless: frozenset = frozenset()  # (cls, name) pairs: the code only runs where none of them exist


class Collector:
    def __init__(self, file: str, tree: ast.AST, nested: set):
        self.file = file
        self.modules = MODULE_NAMES[file]
        self.vars = VARIABLES[file]
        self.nested = nested  # 'Outer.Inner' type keys of any stored version
        self.uses: list[Use] = []
        self.unknown: list[str] = []  # assignments from TensorRT expressions to names not in VARIABLES
        self.tree = tree

    # what an expression refers to
    def owner(self, node) -> str | None:
        """The TensorRT class (or MODULE / a nested type key) whose attribute `node.attr` is, if any."""
        key = _key(node)
        if key is None:
            return None
        if key in self.modules:
            return MODULE
        for m in self.modules:
            if key.startswith(m + "."):
                path = key[len(m) + 1:]
                if all(p.isidentifier() for p in path.split(".")):
                    if "." not in path and path[:1].isupper():
                        return path  # trt.Class.attr
                    if path in self.nested:
                        return path  # trt.Outer.Inner.attr
                return None
        cls = self.vars.get(key)
        return cls

    def is_trt(self, key: str | None) -> bool:
        """Does this expression key start from the module or from a TensorRT object?"""
        if key is None:
            return False
        for p in _prefixes(key):
            if p in self.modules or self.vars.get(p):
                return True
        return False

    def guard_of(self, test):
        """(cls, name) when `test` is hasattr(obj, "name") on a TensorRT object, else None."""
        if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "hasattr"
                and len(test.args) == 2 and isinstance(test.args[1], ast.Constant)):
            cls = self.owner(test.args[0])
            if cls:
                return (cls, test.args[1].value)
        return None

    def guards_in(self, test) -> tuple[set, set]:
        """(names `test` being true proves present, names `test` being true proves absent)."""
        g = self.guard_of(test)
        if g:
            return {g}, set()
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            g = self.guard_of(test.operand)
            return (set(), {g}) if g else (set(), set())
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            present, absent = set(), set()
            for v in test.values:
                p, a = self.guards_in(v)
                present |= p
                absent |= a
            return present, absent
        return set(), set()

    # walking
    def run(self):
        self.visit(self.tree, frozenset(), frozenset())
        return self

    def visit(self, node, optional: frozenset, unless: frozenset):
        if isinstance(node, (ast.If, ast.IfExp)):
            present, absent = self.guards_in(node.test)
            self.visit(node.test, optional, unless)
            body = node.body if isinstance(node.body, list) else [node.body]
            orelse = node.orelse if isinstance(node.orelse, list) else [node.orelse]
            single = self.guard_of(node.test)
            negated = (isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)
                       and self.guard_of(node.test.operand))
            for n in body:
                self.visit(n, optional | present, unless | (absent if negated else frozenset()))
            for n in orelse:
                self.visit(n, optional | ({negated} if negated else frozenset()),
                           unless | ({single} if single else frozenset()))
            return
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
            guarded = set()
            for v in node.values:
                self.visit(v, optional | guarded, unless)
                guarded |= self.guards_in(v)[0]
            return
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.NamedExpr)):
            self.check_assignment(node)
        if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            self.check_loop(node)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tensorrt" and (alias.asname or alias.name) not in self.modules:
                    self.unknown.append(f"{self.file}:{node.lineno}: import tensorrt as {alias.asname or alias.name} "
                                        "(add it to MODULE_NAMES)")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "hasattr", "getattr", "setattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            cls = self.owner(node.args[0])
            if cls:
                maybe = node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3)
                self.uses.append(Use(self.file, node.lineno, cls, node.args[1].value, optional=maybe, unless=unless))
        if isinstance(node, ast.Attribute):
            cls = self.owner(node.value)
            if cls:
                key = (cls, node.attr)
                self.uses.append(Use(self.file, node.lineno, cls, node.attr, optional=key in optional, unless=unless))
        for child in ast.iter_child_nodes(node):
            self.visit(child, optional, unless)

    def _bind(self, target, value_key: str | None, line: int):
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._bind(t, None, line)  # unpacking: each element must be known if the value is TensorRT
            return
        tkey = _key(target)
        if tkey is None:
            return
        if value_key in self.modules or (value_key or "").removesuffix("()") in MODULE_FACTORIES:
            if tkey not in self.modules:
                self.unknown.append(f"{self.file}:{line}: {tkey} = <the tensorrt module> (add it to MODULE_NAMES)")
            return
        if tkey in self.vars or tkey in self.modules:
            return
        self.unknown.append(f"{self.file}:{line}: {tkey} = {value_key} (add {tkey!r} to VARIABLES)")

    def check_assignment(self, node):
        value = node.value
        if value is None:
            return
        vkey = _key(value)
        module_value = vkey in self.modules or (vkey or "").removesuffix("()") in MODULE_FACTORIES
        if not (module_value or self.is_trt(vkey)):
            return
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            if isinstance(t, (ast.Tuple, ast.List)):
                for e in t.elts:
                    self._bind(e, f"{vkey}[]", node.lineno)
            else:
                self._bind(t, vkey, node.lineno)

    def check_loop(self, node):
        ikey = _key(node.iter)
        if ikey is None:
            return
        elem = f"{ikey}[]"
        if not self.is_trt(elem):
            return
        line = getattr(node, "lineno", getattr(node.iter, "lineno", 0))
        self._bind(node.target, elem, line)


def _nested_types() -> set:
    return {c for api in VERSIONS.values() for c in api["classes"] if "." in c}


def collect() -> tuple[list[Use], list[str]]:
    uses, unknown = [], []
    nested = _nested_types()
    for rel in SOURCES:
        tree = ast.parse((ROOT / rel).read_text(), filename=rel)
        c = Collector(rel, tree, nested).run()
        uses += c.uses
        unknown += c.unknown
    return uses, unknown


# True: what the `else` of `if hasattr(obj, "name")` uses must exist in every version too, even those where that
# branch never runs (where obj.name exists). False: only in the versions that lack obj.name.
STRICT_FALLBACKS = False


def _required_in(use: Use, api: dict) -> bool:
    if use.optional:
        return False
    return STRICT_FALLBACKS or not any(_exists(api, c, n) for c, n in use.unless)


# -- tests -------------------------------------------------------------------------------------------------
def test_api_files_are_well_formed():
    assert len(VERSIONS) >= 3, f"expected TensorRT API files in {API_DIR}"
    majors = {v.split(".")[0] for v in VERSIONS}
    assert {"10", "11"} <= majors, f"need both 10.x and 11.x, have {sorted(VERSIONS)}"
    for version, api in VERSIONS.items():
        assert api["version"] == version
        assert api["wheel"].endswith(".whl") and version in api["wheel"]
        assert len(api["sha256"]) == 64 and int(api["sha256"], 16) >= 0
        assert isinstance(api["classes"], dict) and len(api["classes"]) > 100
        for cls, members in api["classes"].items():
            assert all(p.isidentifier() for p in cls.split(".")), cls
            assert members == sorted(set(members)) and all(m.isidentifier() for m in members), cls
        assert set(api["enums"]) <= set(api["classes"])
        for enum, values in api["enums"].items():
            assert set(values) <= set(api["classes"][enum]), enum
        for cls, bases in api["bases"].items():
            assert cls in api["classes"] and set(bases) <= set(api["classes"]), cls
        assert api["module"] == sorted(set(api["module"]))
        top = {c for c in api["classes"] if "." not in c}
        assert top <= set(api["module"]), top - set(api["module"])
        assert api["names"] == sorted(set(api["names"])) and len(api["names"]) > 500
        assert len(api["unresolved"]) <= 10, api["unresolved"]  # the extraction still understands the module


def test_known_names_and_removals_are_told_apart():
    for version, api in VERSIONS.items():
        for cls, name in [("ICudaEngine", "get_tensor_name"), ("ICudaEngine", "num_io_tensors"),
                          ("IExecutionContext", "execute_async_v3"), ("IExecutionContext", "set_input_shape"),
                          ("IExecutionContext", "set_tensor_address"), ("Builder", "create_network"),
                          ("OnnxParser", "parse_from_file"), ("Logger", "WARNING"), ("ILogger.Severity", "ERROR"),
                          ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"), ("DataType", "HALF"),
                          (MODULE, "float32"), (MODULE, "__version__"), (MODULE, "ICudaEngine")]:
            assert _exists(api, cls, name), (version, cls, name)
        assert not _exists(api, "ICudaEngine", "no_such_method"), version
        assert _exists(api, "IShuffleLayer", "get_output"), version  # inherited from ILayer
        major = version.split(".")[0]
        # removed in TensorRT 11 (deprecated in 10): the per-class lists see it, the flat name list cannot always
        removed = [("ICudaEngine", "get_device_memory_size_for_profile"), ("BuilderFlag", "FP16"),
                   ("BuilderFlag", "INT8"), ("BuilderFlag", "BF16")]
        for cls, name in removed:
            assert _exists(api, cls, name) == (major == "10"), (version, cls, name)
        if major == "11":
            assert "INT8" in api["names"] and "BF16" in api["names"]  # still DataType values: only per class tells
            assert "EXPLICIT_BATCH" not in api["enums"]["NetworkDefinitionCreationFlag"]


def test_collector_understands_the_sources():
    uses, unknown = collect()
    assert not unknown, "TensorRT objects bound to names the test does not know:\n" + "\n".join(unknown)
    pairs = {(u.cls, u.name) for u in uses}
    for expected in [(MODULE, "Logger"), ("Logger", "WARNING"), ("ICudaEngine", "get_tensor_name"),
                     ("IExecutionContext", "execute_async_v3"), ("IExecutionContext", "set_input_shape"),
                     ("Builder", "create_network"), ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED")]:
        assert expected in pairs, f"{expected} not collected; the source or the collector changed"
    for file, variables in VARIABLES.items():
        for cls in {c for c in variables.values() if c}:
            for version, api in VERSIONS.items():
                assert cls in api["classes"], f"VARIABLES of {file} names {cls}, which TensorRT {version} lacks"


def test_every_tensorrt_name_used_exists_in_every_version():
    uses, unknown = collect()
    assert not unknown, "\n".join(unknown)
    missing = []
    for version, api in VERSIONS.items():
        for use in uses:
            if _required_in(use, api) and not _exists(api, use.cls, use.name):
                where = "trt" if use.cls == MODULE else use.cls
                missing.append(f"TensorRT {version}: {where}.{use.name} ({use.file}:{use.line})")
    assert not missing, "TensorRT names used but missing:\n" + "\n".join(sorted(set(missing)))


def test_guards_are_understood():
    src = '''
def f(trt, engine, ctx):
    if hasattr(engine, "get_device_memory_size_for_profile_v2"):
        a = engine.get_device_memory_size_for_profile_v2(0)
    else:
        a = engine.get_device_memory_size_for_profile(0)
    b = getattr(ctx, "device_memory_v9", None)
    c = hasattr(trt, "bfloat16") and trt.bfloat16
    if not hasattr(ctx, "set_device_memory"):
        ctx.device_memory = 0
    return engine.num_io_tensors, trt.DataType.HALF
'''
    c = Collector("runtime/backends/tensorrt.py", ast.parse(src), _nested_types()).run()
    got = {(u.cls, u.name): u for u in c.uses}
    assert got[("ICudaEngine", "get_device_memory_size_for_profile_v2")].optional
    legacy = got[("ICudaEngine", "get_device_memory_size_for_profile")]
    assert not legacy.optional and legacy.unless == {("ICudaEngine", "get_device_memory_size_for_profile_v2")}
    assert got[("IExecutionContext", "device_memory_v9")].optional
    assert got[(MODULE, "bfloat16")].optional
    assert got[("IExecutionContext", "device_memory")].unless == {("IExecutionContext", "set_device_memory")}
    assert not got[("ICudaEngine", "num_io_tensors")].optional and not got[("DataType", "HALF")].optional
    for api in VERSIONS.values():  # the legacy branch never runs: every version has the _v2 method
        assert _required_in(legacy, api) == STRICT_FALLBACKS
    bad = Collector("engines/tensorrt.py", ast.parse("def g(network):\n    layer = network.add_shuffle(x)\n"),
                    set()).run()
    assert bad.unknown and "layer" in bad.unknown[0]
    bad = Collector("engines/tensorrt.py", ast.parse("def g():\n    tr = import_tensorrt()\n"), set()).run()
    assert bad.unknown and "tr" in bad.unknown[0]
