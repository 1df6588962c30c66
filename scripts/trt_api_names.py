"""Record the Python API of several TensorRT releases, without installing or importing TensorRT.

    python scripts/trt_api_names.py [--versions 10.13.3.9 10.16.1.11 11.4.0.106]
                                    [--out engines/data/tensorrt_api] [--wheel-dir /tmp/trt-wheels] [--offline]

For each version this fetches the small ``tensorrt-cu12-bindings`` wheel from PyPI (``tensorrt-cu13-bindings``
when cu12 has no such version) with ``pip download --no-deps --only-binary=:all:`` for CPython 3.11 on
``manylinux_2_28_x86_64``, or takes it from ``--wheel-dir`` when it is already there (``--offline`` never
downloads). The wheel holds the pybind11 module ``tensorrt_bindings/tensorrt.so`` and a small
``__init__.py``; neither is imported or executed.

How the classes and their members are found
-------------------------------------------
pybind11 registers everything when the module is imported, in its init code (``PyInit_tensorrt`` or, with
pybind11 3, ``pybind11_exec_tensorrt``, which call ``tensorrt::bindCore(pybind11::module_&)`` and the other
``bind*`` functions): a class is created by ``generic_type::initialize(type_record)`` (the record holds the
Python name at offset 8 and a pointer to ``class_<T, bases...>::init_instance``), an enum by
``enum_<T>::enum_(scope, "Name")``, and each member by a call that receives its name as a C string in
``%rsi``: ``class_<T>::def*("name", ...)`` and ``enum_<T>::value("NAME", ...)``, or, where the compiler
inlined those, ``add_class_method(cls, "name", ...)``, ``generic_type::def_property_static_impl("name", ...)``
and ``enum_base::value("NAME", ...)``. The module is not stripped, so ``objdump -d -C`` (GNU binutils; pass
``--objdump`` if it is not on PATH) shows that code with the callees' names.

This script walks the registration functions in call order with a small model of the machine state: which
registers and stack slots hold the address of a string in ``.rodata`` (``lea str(%rip)``), of a stack slot,
or of a class object created earlier (xmm registers as two 8-byte lanes, since the compiler moves
pointer pairs through them). At each call above it reads the name argument; the class a member belongs to
is the class object passed as ``this`` (``%rdi``; chained calls return it in ``%rax``). That matters: the
linker folds identical template instances, so a callee named ``class_<IErrorRecorder>::def_property`` may
well be defining a property of ``ICudaEngine``; the callee's template argument is only a fallback when
``this`` is unknown (and a disagreement is counted, not trusted). Clones whose name argument the compiler
constant-folded into their body (``[clone .constprop.N]``) are interpreted too. Nested types come from the
enum's or class's scope argument and are stored as ``Outer.Inner`` (``ILogger.Severity``); base classes come
from the ``class_<T, Base...>`` arguments. Module attributes come from ``module_::def``/``add_object``,
``m.attr("name") = ...`` and ``export_values()``. The wheel's ``__init__.py`` is read with ``ast`` for what
it adds (``Logger.WARNING``, ``Logger.Severity``, ``DataType.itemsize``, ``__version__``, ...).

Trust: every version must show the classes and members listed in ``SANITY`` (else the script stops),
``resolution`` in the JSON counts how each member's class was found (``this`` should dominate), and every
registration whose name could not be read is listed in ``unresolved`` (10.16/11.4: the class that
``py::bind_vector`` makes for ``std::vector<PluginField>``, whose name arrives as a ``std::string``, and
its methods). Names registered by functions this walk does not enter can be missing (in 10.13 that same
``bind_vector`` class); the flat ``names`` list (every identifier the registration code references, plus
all classes and members) is the coarse fallback. ``--trace DIR`` writes every class and member as found.

Output: ``<out>/<version>.json`` with ``version``, ``package``, ``wheel``, ``sha256`` (of the wheel),
``module`` (module-level names), ``classes`` ({class or enum: sorted member names, own only}), ``enums``
({enum: its values}), ``bases`` ({class: base classes}), ``names``, ``resolution`` and ``unresolved``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_VERSIONS = ["10.13.3.9", "10.16.1.11", "11.4.0.106"]
PACKAGES = ["tensorrt-cu12-bindings", "tensorrt-cu13-bindings"]
PLATFORM = "manylinux_2_28_x86_64"
PYTHON_VERSION = "3.11"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "engines" / "data" / "tensorrt_api"
DEFAULT_WHEEL_DIR = Path("/tmp/trt-wheels")

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{1,80}$")  # the flat `names` list
MEMBER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,80}$")  # a member or class name may be one letter


# -- wheels ------------------------------------------------------------------------------------------------
def _wheel_glob(version: str) -> list[str]:
    return [f"{pkg.replace('-', '_')}-{version}-*.whl" for pkg in PACKAGES]


def find_wheel(version: str, wheel_dir: Path) -> Path | None:
    for pattern in _wheel_glob(version):  # cu12 first
        hits = sorted(wheel_dir.glob(pattern))
        if hits:
            return hits[0]
    return None


def download_wheel(version: str, wheel_dir: Path) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for pkg in PACKAGES:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", PYTHON_VERSION, "--platform", PLATFORM, "-d", str(wheel_dir), f"{pkg}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            wheel = find_wheel(version, wheel_dir)
            if wheel:
                return wheel
        errors.append(f"{pkg}: " + (proc.stderr.strip().splitlines() or ["failed"])[-1])
    raise SystemExit(f"cannot download the TensorRT {version} bindings wheel: " + "; ".join(errors))


def read_wheel(wheel: Path) -> tuple[bytes, str | None, str]:
    """(the compiled module, the package __init__.py text, the module's path in the wheel)."""
    with zipfile.ZipFile(wheel) as zf:
        sos = [n for n in zf.namelist() if re.search(r"(^|/)tensorrt[^/]*\.so$", n)]
        if not sos:
            raise SystemExit(f"{wheel.name}: no compiled tensorrt*.so inside")
        so_name = sorted(sos, key=len)[0]
        init_name = str(Path(so_name).parent / "__init__.py")
        init = zf.read(init_name).decode() if init_name in zf.namelist() else None
        return zf.read(so_name), init, so_name


# -- ELF -----------------------------------------------------------------------------------------------------
class Elf:
    """Just enough of ELF64 little-endian to read C strings by virtual address."""

    def __init__(self, data: bytes):
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise SystemExit("the bindings module is not a 64-bit little-endian ELF file")
        self.data = data
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        raw = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names_off = raw[shstrndx][4]
        self.sections = {self._cstr(names_off + r[0]).decode(): r for r in raw}
        if ".rodata" not in self.sections:
            raise SystemExit("the bindings module has no .rodata section")

    def _cstr(self, off: int) -> bytes:
        return self.data[off:self.data.index(b"\0", off)]

    def rodata_string(self, addr: int) -> str | None:
        _, _, _, vaddr, off, size = self.sections[".rodata"]
        if vaddr <= addr < vaddr + size:
            raw = self._cstr(addr - vaddr + off)
            try:
                return raw.decode("ascii")
            except UnicodeDecodeError:
                return None
        return None


# -- disassembly ---------------------------------------------------------------------------------------------
HEADER_RE = re.compile(r"^([0-9a-f]+) <(.*)>:$")
INSN_RE = re.compile(r"^\s+([0-9a-f]+):\t(\S+)\s*(.*)$")
TARGET_RE = re.compile(r"^([0-9a-f]+) <(.*)>$")
COMMENT_RE = re.compile(r"#\s*([0-9a-f]+)(?:\s+<(.*)>)?\s*$")


def disassemble(so_bytes: bytes, objdump: str) -> dict[int, tuple[str, list]]:
    """{function address: (demangled name, [(address, mnemonic, operand text), ...])} for .text."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tensorrt.so"
        path.write_bytes(so_bytes)
        proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", "-j", ".text", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"objdump failed: {proc.stderr.strip()[:300]}")
    funcs: dict[int, tuple[str, list]] = {}
    body = None
    for line in proc.stdout.splitlines():
        m = INSN_RE.match(line)
        if m and body is not None:
            body.append((int(m.group(1), 16), m.group(2), m.group(3)))
            continue
        m = HEADER_RE.match(line)
        if m:
            body = []
            funcs[int(m.group(1), 16)] = (m.group(2), body)
    return funcs


_REG64 = {}
for _r in "abcd":
    for _n in (f"r{_r}x", f"e{_r}x", f"{_r}x", f"{_r}l"):
        _REG64[_n] = f"r{_r}x"
for _r in ("si", "di", "bp", "sp"):
    for _n in ("r" + _r, "e" + _r, _r, _r + "l"):
        _REG64[_n] = "r" + _r
for _i in range(8, 16):
    for _n in (f"r{_i}", f"r{_i}d", f"r{_i}w", f"r{_i}b"):
        _REG64[_n] = f"r{_i}"
CALLER_SAVED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


def _operands(text: str) -> list[str]:
    text = text.split("#")[0].strip()
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _reg(op: str) -> str | None:
    return _REG64.get(op[1:]) if op.startswith("%") else None


def _strip_clone(name: str) -> str:
    return re.sub(r"(\s*\[clone [^\]]*\])+$", "", name)


def _template_args(name: str, prefix: str) -> list[str]:
    """All top-level template arguments of the first '<prefix><...>::' in name."""
    for m in re.finditer(re.escape(prefix) + "<", name):
        i, depth, start, args = m.end(), 1, m.end(), []
        while i < len(name) and depth:
            ch = name[i]
            if ch in "<(":
                depth += 1
            elif ch in ">)":
                depth -= 1
            elif ch == "," and depth == 1:
                args.append(name[start:i].strip())
                start = i + 1
            i += 1
        if name[i:i + 2] == "::":
            args.append(name[start:i - 1].strip())
            return args
    return []


def _callee_method(name: str) -> str:
    """'R& pybind11::class_<...>::def_property<...>(char const*, ...)' -> 'def_property'."""
    base = _strip_clone(name)
    # cut the argument list: the last top-level '(...)' group
    depth, i = 0, len(base) - 1
    while i >= 0:
        ch = base[i]
        if ch in ")>":
            depth += 1
        elif ch in "(<":
            depth -= 1
            if depth == 0 and ch == "(":
                break
        i -= 1
    head = base[:i] if i > 0 else base
    # drop a trailing template argument list
    while head.endswith(">"):
        depth, j = 0, len(head) - 1
        while j >= 0:
            depth += head[j] == ">"
            depth -= head[j] == "<"
            if depth == 0:
                break
            j -= 1
        head = head[:j]
    return head.rsplit("::", 1)[-1]


# -- the interpreter ------------------------------------------------------------------------------------------
@dataclass
class Api:
    classes: dict[str, set] = field(default_factory=dict)
    enums: set = field(default_factory=set)
    module: set = field(default_factory=set)
    referenced: set = field(default_factory=set)
    cpp2py: dict[str, str] = field(default_factory=dict)
    bases: dict[str, list] = field(default_factory=dict)
    values: dict[str, set] = field(default_factory=dict)  # enum -> its values
    unresolved: list = field(default_factory=list)
    exports: list = field(default_factory=list)  # (enum key, scope key or None for the module)

    trace: list | None = None

    def add_value(self, cls: str | None, name) -> bool:
        """An enum value (what `__members__` lists)."""
        if self.add(cls, name):
            self.values.setdefault(cls, set()).add(name)
            return True
        return False

    def add(self, cls: str | None, name) -> bool:
        if cls is None or not isinstance(name, str) or not MEMBER_RE.match(name):
            return False
        self.classes.setdefault(cls, set()).add(name)
        if self.trace is not None:
            self.trace.append(f"  {cls}.{name}")
        return True


# a registration function: `tensorrt::bindCore(pybind11::module_&)`, `pybind11_init_tensorrt(pybind11::module_&)`
BINDER_RE = re.compile(r"^[\w:]+\(pybind11::module_&\)$")
# the module's init code: PyInit_tensorrt (pybind11 < 3), or the exec slot of multi-phase init (pybind11 3)
ENTRY_RE = re.compile(r"^(PyInit_\w+|(\w+::)*pybind11_exec_\w+\(_object\*\))$")

MEMBER_DEFS = ("def", "def_static", "def_property", "def_property_readonly", "def_property_static",
               "def_property_readonly_static", "def_readwrite", "def_readonly", "def_readwrite_static",
               "def_readonly_static")


def _address(op: str, regs: dict, frame: int):
    """Memory operand -> slot key: '0x48(%rsp)' -> (frame, 'rsp', 0x48); '-0x8(%r12)' with %r12 holding a
    stack address -> that slot; '(%rdi)' with %rdi holding a Python object marker -> ('obj', marker); else None."""
    m = re.match(r"^(-?)(0x[0-9a-f]+|\d+)?\((%\w+)\)$", op)
    if not m:
        return None
    off = int(m.group(2), 0) if m.group(2) else 0
    off = -off if m.group(1) else off
    base = _reg(m.group(3))
    if base in ("rsp", "rbp"):
        return (frame, base, off)
    val = regs.get(base)
    if isinstance(val, tuple) and val[0] == "stk":
        return (val[1], val[2], val[3] + off)
    if isinstance(val, tuple) and val[0] in ("module", "pyobj") and off == 0:
        return ("obj", val)
    return None


NO_WRITE = {"cmp", "cmpb", "cmpw", "cmpl", "cmpq", "test", "testb", "testw", "testl", "testq", "bt", "btl", "btq",
            "ucomiss", "ucomisd", "comiss", "comisd", "push", "pushq", "ret", "leave", "endbr64", "ud2", "hlt"}


class _State:
    """What the interpreter knows about one function activation: registers and memory slots holding string
    addresses (str), symbol addresses (('sym', name)), stack addresses (('stk', frame, base, offset)) or
    Python object handles (('module',), ('pyobj', key)); xmm registers as two 8-byte lanes."""

    frames = 0

    def __init__(self, regs: dict, objects: dict):
        _State.frames += 1
        self.frame = _State.frames
        self.regs = regs
        self.objects = objects  # stack slot of a pybind11 class_/enum_ object -> its key
        self.xmm: dict[str, list] = {}
        self.mem: dict[tuple, object] = {}
        self.stored: list = []  # strings written to memory since the last call (accessor keys)
        self.in_record = False  # between type_record() and generic_type::initialize()

    def after_call(self):
        for r in CALLER_SAVED:
            self.regs.pop(r, None)
        self.xmm.clear()
        self.stored = []

    def addr(self, op: str):
        return _address(op, self.regs, self.frame)

    def load(self, addr):
        if addr is None:
            return None
        if addr[0] == "obj":
            return addr[1]  # the handle inside a class_/module_ object
        if addr in self.objects:
            return ("pyobj", self.objects[addr])
        return self.mem.get(addr)

    def store(self, addr, val):
        if addr is not None:
            self.mem[addr] = val
        if isinstance(val, str):
            self.stored.append(val)

    def step(self, mnem: str, ops: list[str]):
        regs = self.regs
        if len(ops) == 2:
            src, dst = ops
            rs, rd = _reg(src), _reg(dst)
            xs = src[1:] if src.startswith("%xmm") else None
            xd = dst[1:] if dst.startswith("%xmm") else None
            if mnem == "lea" and rd:
                a = self.addr(src)
                regs[rd] = ("stk", *a) if a and a[0] != "obj" else None
                return
            if mnem == "mov":
                if rs and rd:
                    regs[rd] = regs.get(rs) if src.startswith("%r") and dst.startswith("%r") else None
                    return
                if rd:
                    regs[rd] = self.load(self.addr(src)) if dst.startswith("%r") else None
                    return
                if rs or src.startswith("$"):
                    self.store(self.addr(dst), regs.get(rs) if rs and src.startswith("%r") else None)
                    return
            if mnem == "movq":
                if rs and xd:
                    self.xmm[xd] = [regs.get(rs), None]
                    return
                if xs and rd:
                    regs[rd] = self.xmm.get(xs, [None, None])[0]
                    return
                if xs and not xd:  # 8-byte store of the low lane
                    self.store(self.addr(dst), self.xmm.get(xs, [None, None])[0])
                    return
                if xd and not rs:
                    self.xmm[xd] = [self.load(self.addr(src)), None]
                    return
                if src.startswith("$") and not rd:
                    self.store(self.addr(dst), None)
                    return
            if mnem == "punpcklqdq" and xs and xd:
                self.xmm[xd] = [self.xmm.get(xd, [None, None])[0], self.xmm.get(xs, [None, None])[0]]
                return
            if mnem in ("movaps", "movups", "movdqa", "movdqu", "vmovdqa", "vmovdqu", "vmovaps", "vmovups"):
                if xs and xd:
                    self.xmm[xd] = list(self.xmm.get(xs, [None, None]))
                    return
                a = self.addr(dst if xs else src)
                a2 = (a[0], a[1], a[2] + 8) if a and a[0] != "obj" else None
                if xs:  # 16-byte store
                    lanes = self.xmm.get(xs, [None, None])
                    self.store(a, lanes[0])
                    self.store(a2, lanes[1])
                    return
                if xd:
                    self.xmm[xd] = [self.load(a), self.load(a2)]
                    return
        # anything else: forget what its destination held
        if mnem in NO_WRITE or mnem.startswith(("j", "nop", "prefetch")):
            return
        if mnem in ("pop", "popq"):
            # only epilogues pop; the code after an early `ret` is reached by jumps from the body, where the
            # callee-saved registers still held the body's values
            return
        if ops:
            last = ops[-1]
            if _reg(last):
                regs.pop(_reg(last), None)
            elif last.startswith("%xmm"):
                self.xmm.pop(last[1:], None)
            else:
                a = self.addr(last)
                if a and a[0] != "obj":
                    self.mem.pop(a, None)
                    self.mem.pop((a[0], a[1], a[2] + 8), None)
        if mnem in ("xchg", "cmpxchg", "xadd") and len(ops) == 2 and _reg(ops[0]):
            regs.pop(_reg(ops[0]), None)


class Extractor:
    """Follows the module's registration code and fills an Api."""

    def __init__(self, elf: Elf, funcs: dict[int, tuple[str, list]]):
        self.elf, self.funcs, self.api = elf, funcs, Api()
        self.objects: dict[tuple, str] = {}  # stack slot of a class_/enum_ object -> key
        self.current: str | None = None  # the class or enum defined last (for the rare call without `this`)
        self.pending_type: list | None = None  # class_<...> template arguments of the type_record being filled
        self.registered = 0
        self.how: dict[str, int] = {}  # how the owner of each member was found (diagnostics)
        self.lookups: list | None = None  # attribute names looked up inside a followed def clone

    # -- classes ----------------------------------------------------------------------------------------
    def scope_key(self, handle) -> str | None:
        """'' for the module, a class key for a class scope, None when unknown."""
        if isinstance(handle, tuple):
            if handle[0] == "module":
                return ""
            if handle[0] == "pyobj":
                return handle[1]
            if handle[0] == "stk":
                if handle[1:] in self.objects:
                    return self.objects[handle[1:]]
        return None

    def register(self, type_args: list | None, name, enum: bool, this, scope) -> None:
        """A new class or enum. type_args: the C++ class_<...> template arguments (type, then options: bases,
        holder, trampoline), when known."""
        cpp = type_args[0] if type_args else None
        if not isinstance(name, str) or not MEMBER_RE.match(name):
            self.api.unresolved.append(("class", cpp))
            self.current = None  # what follows is unresolved rather than put into the wrong class
            if isinstance(this, tuple) and this[0] == "stk":
                self.objects.pop(this[1:], None)
            return
        self.registered += 1
        outer = self.scope_key(scope)
        if outer is None and cpp and "::" in cpp:  # unknown scope: nest like the C++ type is nested
            outer = self.api.cpp2py.get(cpp.rsplit("::", 1)[0], "")
        key = f"{outer}.{name}" if outer else name
        if self.api.trace is not None:
            self.api.trace.append(f"{'enum' if enum else 'class'} {key} <- {cpp} (this={this}, scope={scope})")
        if cpp:
            self.api.cpp2py[cpp] = key
        bases = [self.api.cpp2py[a] for a in (type_args or [])[1:] if a in self.api.cpp2py]
        if bases:
            self.api.bases[key] = bases
        self.api.classes.setdefault(key, set())
        if enum:
            self.api.enums.add(key)
        if not outer:
            self.api.module.add(key)
        if isinstance(this, tuple) and this[0] == "stk":
            self.objects[this[1:]] = key
        self.current = key

    def owner(self, this, callee: str | None = None, prefix: str | None = None) -> str | None:
        """The class a member call is for: from `this` (the class_ object, or the enum_base inside an enum_),
        else from the callee's template argument, else the class defined last."""
        by_this = by_template = None
        if isinstance(this, tuple) and this[0] == "pyobj":
            by_this = this[1]
        elif isinstance(this, tuple) and this[0] == "stk":
            for delta in (0, -8):
                slot = (this[1], this[2], this[3] + delta)
                if slot in self.objects:
                    by_this = self.objects[slot]
                    break
        if callee and prefix:
            cpp = (_template_args(callee, prefix) or [None])[0]
            by_template = self.api.cpp2py.get(cpp) if cpp else None
        if by_this and by_template and by_this != by_template:
            self.how["disagree"] = self.how.get("disagree", 0) + 1  # identical code folded under one name
            if self.api.trace is not None:
                self.api.trace.append(f"  DISAGREE this={by_this} template={by_template}")
        how = "this" if by_this else "template" if by_template else "last"
        if how != "this" and self.api.trace is not None:
            self.api.trace.append(f"  BY-{how} this={this} current={self.current} callee={(callee or '')[:150]}")
        self.how[how] = self.how.get(how, 0) + 1
        self.current = by_this or by_template or self.current
        return self.current

    # -- walking ----------------------------------------------------------------------------------------
    def run(self, addr: int, regs: dict | None = None, depth: int = 0, visiting: frozenset = frozenset()) -> int:
        """Interpret one function in address order (straight-line; branches are not followed, which suits
        registration code: one long block of calls); returns how many names it registered."""
        _, body = self.funcs[addr]
        st = _State(dict(regs or {}), self.objects)
        found = 0
        for _, mnem, text in body:
            ops = _operands(text)
            if mnem in ("call", "jmp") and TARGET_RE.match(text.strip()):
                m = TARGET_RE.match(text.strip())
                target, callee = int(m.group(1), 16), m.group(2)
                if mnem == "jmp" and (target not in self.funcs or target == addr):
                    continue  # a branch inside the function
                if ".cold" in callee:
                    continue  # exception paths split off by the compiler
                this = st.regs.get("rdi")
                found += self.on_call(target, callee, st, depth, visiting | {addr}) or 0
                if isinstance(this, tuple) and this[0] == "stk" and "type_record::type_record()" in callee:
                    self.objects.pop(this[1:], None)  # the slot is reused for a new type record
                st.after_call()
                if re.match(r"^pybind11::(class_|enum_)<", _strip_clone(callee).split(">& ", 1)[-1]) and \
                        _callee_method(callee) in MEMBER_DEFS + ("value", "export_values"):
                    st.regs["rax"] = this  # def*() and value() return *this: chained calls
                continue
            if mnem == "call":  # indirect
                st.after_call()
                continue
            if mnem == "lea" and len(ops) == 2 and "(%rip)" in ops[0]:
                m = COMMENT_RE.search(text)
                dst = _reg(ops[1])
                if m and dst:
                    s = self.elf.rodata_string(int(m.group(1), 16))
                    if s is not None:
                        st.regs[dst] = s
                        if depth == 0 and NAME_RE.match(s):
                            self.api.referenced.add(s)
                    else:
                        sym = m.group(2) or ""
                        st.regs[dst] = ("sym", sym)
                        if st.in_record and "::init_instance" in sym:
                            self.pending_type = _template_args(sym, "pybind11::class_") or None
                continue
            st.step(mnem, ops)
        return found

    def follow(self, target: int, args: dict, depth: int, visiting: frozenset) -> int:
        """Interpret a callee (a clone whose arguments were constant-folded into it) with the caller's arguments."""
        if target in self.funcs and depth < 3 and target not in visiting:
            return self.run(target, dict(args), depth + 1, visiting)
        return 0

    def on_call(self, target, callee, st: _State, depth, visiting) -> int:
        api = self.api
        args = {r: st.regs.get(r) for r in ARG_REGS}
        base = _strip_clone(callee)
        if "type_record::type_record()" in base:
            self.pending_type = None  # [C++ type, its class_ options...] once the init_instance pointer is seen
            st.in_record = True
            return 0
        if "generic_type::initialize(" in base:  # (this, const type_record &rec): rec.scope at 0, rec.name at 8
            rec, name, scope = args["rsi"], None, None
            if isinstance(rec, tuple) and rec[0] == "stk":
                scope = st.load((rec[1], rec[2], rec[3]))
                name = st.load((rec[1], rec[2], rec[3] + 8))
            self.register(self.pending_type, name, False, args["rdi"], scope)
            self.pending_type = None
            st.in_record = False
            return 0
        method = _callee_method(base)
        for kind in ("enum_", "class_"):
            # out-of-line constructors: enum_(this, const handle &scope, name, ...),
            # class_(this, handle scope, name, ...)
            if f"pybind11::{kind}<" in base and method == kind:
                before = self.registered
                self.follow(target, args, depth, visiting)  # the name may be constant-folded into a clone
                if self.registered == before:
                    scope = args["rsi"]
                    if kind == "enum_" and isinstance(scope, tuple) and scope[0] == "stk":
                        scope = st.load(scope[1:])
                    self.register(_template_args(base, f"pybind11::{kind}") or None, args["rdx"], kind == "enum_",
                                  args["rdi"], scope)
                elif kind == "enum_" and self.current:
                    api.enums.add(self.current)
                return 0
        sink = None
        if ("pybind11::class_<" in base and method in MEMBER_DEFS) or (
                "pybind11::enum_<" in base and method == "value"):
            sink = "pybind11::class_" if "pybind11::class_<" in base else "pybind11::enum_"
        if sink:
            cls = self.owner(args["rdi"], base, sink)
            if (api.add_value if method == "value" else api.add)(cls, args["rsi"]):
                return 1
            n = 0
            if "[clone" in callee:
                saved, self.lookups = self.lookups, []
                n = self.follow(target, args, depth, visiting)
                lookups, self.lookups = self.lookups, saved
                if not n and len(set(lookups)) == 1 and api.add(cls, lookups[0]):
                    n = 1  # def_static: its only sink is the sibling lookup getattr(cls, "name", None)
            if not n:
                api.unresolved.append((cls, method, callee))
            return n
        if self.lookups is not None and ("PyObject_GetAttrString" in base or base.startswith("pybind11::getattr(")):
            name = args["rsi"] if "PyObject_GetAttrString" in base else args["rdx"]
            if isinstance(name, str) and MEMBER_RE.match(name):
                self.lookups.append(name)
            return 0
        if ("detail::add_class_method(" in base or "generic_type::def_property_static_impl(" in base
                or "detail::enum_base::value(" in base):
            cls = self.owner(args["rdi"])
            if (api.add_value if method == "value" else api.add)(cls, args["rsi"]):
                return 1
            api.unresolved.append((cls, method, callee))
            return 0
        if method == "export_values" and ("enum_base::" in base or "pybind11::enum_<" in base):
            self.export(self.owner(args["rdi"]))
            return 0
        if "pybind11::module_::def<" in base or "pybind11::module_::add_object(" in base \
                or base.startswith("pybind11::module_::def("):
            if isinstance(args["rsi"], str) and MEMBER_RE.match(args["rsi"]):
                api.module.add(args["rsi"])
                return 1
            n = self.follow(target, args, depth, visiting) if "[clone" in callee else 0
            if not n:
                api.unresolved.append(("<module>", method, callee))
            return n
        if depth == 0 and "accessor<pybind11::detail::accessor_policies::str_attr>::operator=" in base:
            keys = [s for s in st.stored if MEMBER_RE.match(s)]
            if keys:
                api.module.add(keys[-1])  # m.attr("float32") = DataType::kFLOAT
                return 1
            api.unresolved.append(("<module>", "attr", callee))
            return 0
        if depth == 0 and target in self.funcs and target not in visiting and BINDER_RE.match(base):
            self.run(target, {"rdi": ("module",)}, 0, visiting)  # the next registration function, in call order
        return 0

    def export(self, enum_key: str | None):
        if enum_key:
            scope = enum_key.rsplit(".", 1)[0] if "." in enum_key else None
            self.api.exports.append((enum_key, scope))


def _apply_exports(api: Api):
    for enum_key, scope in api.exports:
        members = api.values.get(enum_key, set())
        if scope is None:
            api.module |= members
        else:
            api.classes.setdefault(scope, set()).update(members)


# -- __init__.py ---------------------------------------------------------------------------------------------
def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def apply_init_py(api: Api, source: str):
    """Names the package's __init__.py adds (read with ast, never run): module-level defs and assignments,
    `Cls.attr = ...`, and `setattr(Cls, attr, value)` in a loop over an enum's `__members__`."""
    _apply_statements(api, ast.parse(source).body)


def _apply_statements(api: Api, body: list):
    for node in body:  # module level only: the Windows loader code sits in `if` blocks that are not constant
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            api.module.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    api.module.add(t.id)
                elif isinstance(t, ast.Attribute) and _dotted(t.value) in api.classes:
                    owner = _dotted(t.value)
                    api.classes[owner].add(t.attr)
                    alias = _dotted(node.value) if isinstance(node.value, ast.Attribute) else None
                    if alias in api.classes:  # Logger.Severity = ILogger.Severity
                        api.classes.setdefault(f"{owner}.{t.attr}", set()).update(api.classes[alias])
                        if alias in api.enums:
                            api.enums.add(f"{owner}.{t.attr}")
                            api.values[f"{owner}.{t.attr}"] = set(api.values.get(alias, ()))
        elif isinstance(node, ast.Delete):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    api.module.discard(t.id)
        elif isinstance(node, ast.If) and _constant(node.test) is True:  # `if "tensorrt" == "tensorrt" ...:`
            _apply_statements(api, node.body)
        elif isinstance(node, ast.For):
            # for attr, value in ILogger.Severity.__members__.items(): setattr(Logger, attr, value)
            it = node.iter
            if (isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr == "items"
                    and isinstance(it.func.value, ast.Attribute) and it.func.value.attr == "__members__"):
                enum = _dotted(it.func.value.value)
                for stmt in node.body:
                    call = stmt.value if isinstance(stmt, ast.Expr) else None
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "setattr"
                            and call.args and _dotted(call.args[0]) in api.classes and enum in api.values):
                        api.classes[_dotted(call.args[0])].update(api.values[enum])


def _constant(node):
    """The value of a constant test such as `"tensorrt" == "tensorrt" or ...`; None when it is not constant."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        v = _constant(node.operand)
        return None if v is None else not v
    if isinstance(node, ast.BoolOp):
        vals = [_constant(v) for v in node.values]
        if any(v is None for v in vals):
            return None
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
        a, b = _constant(node.left), _constant(node.comparators[0])
        if a is None or b is None:
            return None
        return (a == b) if isinstance(node.ops[0], ast.Eq) else (a != b)
    return None


# -- per version ---------------------------------------------------------------------------------------------
# (class, member) pairs every supported TensorRT has; a version missing one means the extraction broke
SANITY = [("ICudaEngine", "get_tensor_name"), ("ICudaEngine", "num_io_tensors"),
          ("IExecutionContext", "execute_async_v3"), ("IExecutionContext", "set_input_shape"),
          ("Builder", "create_network"), ("IBuilderConfig", "set_memory_pool_limit"), ("OnnxParser", "parse_from_file"),
          ("TensorIOMode", "OUTPUT"), ("Logger", "WARNING"), ("Runtime", "deserialize_cuda_engine"),
          ("ILogger.Severity", "WARNING"), ("IOptimizationProfile", "set_shape")]
MODULE_SANITY = ["Builder", "Runtime", "Logger", "float32", "int64", "DataType", "__version__"]


def _sanity(api: Api, version: str):
    missing = [f"{c}.{n}" for c, n in SANITY if n not in api.classes.get(c, ())]
    missing += [f"trt.{n}" for n in MODULE_SANITY if n not in api.module]
    if missing:
        raise SystemExit(f"TensorRT {version}: the extraction did not find {', '.join(missing)}; "
                         "the module's code shape changed, so this script needs an update")


def extract(wheel: Path, objdump: str, trace: list | None = None) -> dict:
    so_bytes, init_py, so_name = read_wheel(wheel)
    elf = Elf(so_bytes)
    funcs = disassemble(so_bytes, objdump)
    ex = Extractor(elf, funcs)
    ex.api.trace = trace
    entries = [a for a, (n, _) in funcs.items() if ENTRY_RE.match(n)]
    if not entries:
        raise SystemExit(f"{wheel.name}: no PyInit_/pybind11_exec_ function in {so_name}")
    for entry in entries:
        ex.run(entry)
    api = ex.api
    if not api.classes:
        raise SystemExit(f"{wheel.name}: found no pybind11 classes (is {so_name} stripped?)")
    _apply_exports(api)
    if init_py:
        apply_init_py(api, init_py)
    return {"so": so_name, "api": api, "how": ex.how}


def _describe(u: tuple) -> str:
    """One unresolved registration, shortly: 'class <C++ type>' or '<owner>: <call>'."""
    if u[0] == "class":
        return f"class {u[1]} (name not found)"
    callee = _strip_clone(u[2]) if len(u) > 2 else ""
    return f"{u[0] or '?'}: {u[1]} {callee[:120]}".strip()


def version_record(version: str, wheel: Path, objdump: str, trace: list | None = None) -> dict:
    got = extract(wheel, objdump, trace)
    api: Api = got["api"]
    _sanity(api, version)
    names = set(api.referenced) | set(api.module)
    for cls, members in api.classes.items():
        names |= set(members) | set(cls.split("."))
    names = sorted(n for n in names if NAME_RE.match(n))
    package = wheel.name.split("-")[0].replace("_", "-")
    return {
        "version": version,
        "package": package,
        "wheel": wheel.name,
        "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "module_file": got["so"],
        "method": "pybind11 registrations read from objdump -d of the module's init code (scripts/trt_api_names.py)",
        "resolution": dict(sorted(got["how"].items())),
        "unresolved": sorted({_describe(u) for u in api.unresolved}),
        "module": sorted(api.module),
        "enums": {e: sorted(api.values.get(e, ())) for e in sorted(api.enums)},
        "bases": {c: b for c, b in sorted(api.bases.items())},
        "classes": {c: sorted(m) for c, m in sorted(api.classes.items())},
        "names": names,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", nargs="+", default=DEFAULT_VERSIONS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--wheel-dir", type=Path, default=DEFAULT_WHEEL_DIR,
                    help="where wheels are looked for first and downloaded to (default /tmp/trt-wheels)")
    ap.add_argument("--offline", action="store_true", help="only use wheels already in --wheel-dir")
    ap.add_argument("--objdump", default=shutil.which("objdump") or "objdump")
    ap.add_argument("--trace", type=Path, help="write <version>.trace.txt (every class and member as found) here")
    args = ap.parse_args(argv)
    if not shutil.which(args.objdump) and not Path(args.objdump).is_file():
        raise SystemExit("objdump (GNU binutils) is needed: apt-get install binutils, or pass --objdump")
    args.out.mkdir(parents=True, exist_ok=True)
    for version in args.versions:
        wheel = find_wheel(version, args.wheel_dir)
        if wheel is None:
            if args.offline:
                raise SystemExit(f"no wheel for TensorRT {version} in {args.wheel_dir} (--offline)")
            print(f"{version}: downloading the bindings wheel to {args.wheel_dir}", flush=True)
            wheel = download_wheel(version, args.wheel_dir)
        trace = [] if args.trace else None
        rec = version_record(version, wheel, args.objdump, trace)
        if args.trace:
            args.trace.mkdir(parents=True, exist_ok=True)
            (args.trace / f"{version}.trace.txt").write_text("\n".join(trace) + "\n")
        path = args.out / f"{version}.json"
        path.write_text(json.dumps(rec, indent=0, sort_keys=False) + "\n")
        n_members = sum(len(v) for v in rec["classes"].values())
        print(f"{version}: {wheel.name}: {len(rec['classes'])} classes/enums, {n_members} members, "
              f"{len(rec['names'])} names, {len(rec['unresolved'])} unresolved -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
