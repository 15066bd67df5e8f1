"""Facades over cv2, PIL, numpy and os whose file functions only reach the session's inputs and scratch dir.

RestrictedPython stops ``_``-names and raw ``__import__``, but the libraries the model needs are full of ways out:
``PIL.Image.os`` is the os module, ``cv2.imwrite`` writes anywhere, ``np.load(allow_pickle=True)`` runs pickles,
``cv2.VideoCapture`` opens devices and URLs (env-findings.md 6). A facade is what ``import cv2`` returns inside the
sandbox: attributes come from the real module, except that file functions are wrapped by :class:`PathPolicy`,
known ways out are refused by name, and any attribute that is itself a module is refused unless it is a listed
submodule (which gets its own facade). These run inside the worker process, which is the next layer out.
"""

from __future__ import annotations

import encodings.cp437  # noqa: F401 - zipfile reads member names in cp437
import enum
import functools
import logging
import os
import re
import string
import uuid
import zipfile  # noqa: F401 - np.savez/np.load(.npz) import it lazily, once the worker can no longer read the stdlib
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from thyme.sandbox.errors import PolicyViolation
from thyme.sandbox.repair import OUTPUT_ALIAS

CV2_CONFINED_READS = ("imread", "imreadmulti")
CV2_CONFINED_WRITES = ("imwrite",)
# Substrings of cv2 names that open files, devices, windows or URLs; refused unless confined above.
CV2_REFUSED_WORDS = ("read", "write", "load", "save", "video", "capture", "cascade", "storage", "file", "window",
                     "mesh", "pointcloud", "config", "samples", "dnn", "dump", "facedetectoryn")
# Parameter names in OpenCV's signatures (docstrings and the shipped .pyi stubs) that name a file, a model or a
# directory on disk: a function, method or constructor taking one is refused, whatever its name.
CV2_PATH_PARAMETER = re.compile(
    r"(?i)^(file\w*|\w*filename|\w*file|\w*path\w*|model|modelpath|modeldata|buffermodel|config|bufferconfig|"
    r"\w*proto\w*|\w*onnx\w*|dirs?|directory|url|net|backbone|neckhead|kernel_r1|kernel_cls1)$"
)
_CV2_SIGNATURE = re.compile(r"^\s*[\w.]+\(([^)]*)\)\s*->", re.MULTILINE)
CV2_FLANN_INDEX_SAVED = 254
"""FLANN's ``algorithm`` value that loads an index from the ``filename`` of the index parameters."""
NUMPY_REFUSED = frozenset({"fromfile", "memmap", "fromregex", "DataSource", "tofile", "ctypeslib", "f2py", "testing",
                           "lib", "show_config", "show_runtime", "info", "test", "from_dlpack", "get_include",
                           "load_library", "recarray"})
# Not numpy.ma (ma.dump/ma.load pickle to and from files) nor numpy.rec (rec.fromfile).
NUMPY_SUBMODULES = frozenset({"linalg", "random", "fft", "polynomial", "emath", "char", "strings"})
PIL_SUBMODULES = frozenset({"Image", "ImageEnhance", "ImageFilter", "ImageOps", "ImageDraw", "ImageFont", "ImageStat",
                            "ImageChops", "ImageColor", "ImageSequence", "ImageTransform", "ExifTags"})
# Methods of library classes that touch files or spawn viewers, by the library whose class defines them; PIL's
# Image.save is confined instead (policy.py). For cv2 any method name containing one of the words is refused
# (Algorithm.save, FileStorage.write, dnn_Net.dumpToFile, HOGDescriptor.load, ...).
# ndarray.resize(refcheck=False) frees memory that views still point at; np.resize() (a copy) is the function to use.
REFUSED_METHODS = {"numpy": frozenset({"tofile", "dump", "ctypes", "resize"}),
                   "PIL": frozenset({"show", "font_variant"})}
CV2_REFUSED_METHOD_WORDS = ("file", "dump", "save", "write", "load", "read", "open")
STRING_NAMES = ("ascii_letters", "ascii_lowercase", "ascii_uppercase", "digits", "hexdigits", "octdigits",
                "punctuation", "printable", "whitespace", "capwords")
UUID_NAMES = ("uuid4", "uuid3", "uuid5", "UUID", "NAMESPACE_DNS", "NAMESPACE_URL", "NAMESPACE_OID", "NAMESPACE_X500")
FUNCTOOLS_NAMES = ("reduce", "partial", "lru_cache", "cache", "cmp_to_key", "wraps")
# PIL.Image by allow-list: its registries (OPEN, SAVE, ID, DECODERS...), register_* functions, logger and typing
# helpers are ways to plugin classes and paths, and an image program needs none of them. Constants and enums of
# the module are added to these (see _pil_image_names).
PIL_IMAGE_NAMES = frozenset({
    "open", "new", "fromarray", "frombytes", "frombuffer", "merge", "blend", "composite", "alpha_composite", "eval",
    "linear_gradient", "radial_gradient", "effect_mandelbrot", "effect_noise", "getmodebands", "getmodebase",
    "getmodetype", "getmodebandnames", "Image", "Exif", "UnidentifiedImageError", "DecompressionBombError",
    "DecompressionBombWarning", "MAX_IMAGE_PIXELS", "MODES",
})
STDLIB_REFUSED = {"time": frozenset({"get_clock_info"})}
"""``time.get_clock_info`` returns a ``SimpleNamespace``, whose class takes any attribute name."""


def is_refused_method(library: str, name: str, value: Any = None) -> bool:
    """Whether attribute ``name`` (holding ``value``) of a class from ``library`` (a top-level package) is refused."""
    if library == "cv2":
        return any(word in name.lower() for word in CV2_REFUSED_METHOD_WORDS) or cv2_takes_path(value)
    return name in REFUSED_METHODS.get(library, ())


def cv2_takes_path(value: Any) -> bool:
    """Whether an OpenCV function or method has a file, model or directory parameter in its signature."""
    doc = getattr(value, "__doc__", None) if callable(value) else None
    if not isinstance(doc, str):
        return False
    return any(CV2_PATH_PARAMETER.match(parameter)
               for match in _CV2_SIGNATURE.finditer(doc) for parameter in re.findall(r"\w+", match.group(1)))


PIL_CORE_TYPES = frozenset({"ImagingCore", "ImagingDraw", "ImagingFont", "Font", "ImagingDecoder", "ImagingEncoder"})
"""PIL's C objects behind ``im.im``, ``draw.draw``, ``font.font``: raw pixel buffers (``ptr``) and unchecked
operations that PIL's Python layer validates before calling them. The code uses the Python layer."""


def is_unsafe_value(value: Any) -> bool:
    """Values no attribute may hand the code, whatever object holds them.

    Modules (a way to os/sys), metaclasses and member-less enums (they build classes from a dict, so a class can
    carry ``__array_interface__`` pointing at any address), ``SimpleNamespace`` (an object with any attribute name),
    ``PyCapsule`` (raw C pointers numpy accepts as ``__array_struct__``), ctypes objects (``from_address``) and
    loggers (their handlers open files), and the ``memoryview`` class (``memoryview(a).cast('B')`` is a writable
    byte view of any buffer, an array of object pointers included).
    """
    if isinstance(value, (ModuleType, SimpleNamespace, logging.Logger)):
        return True
    if value is SimpleNamespace or value is memoryview:  # `is`: `in` would compare arrays elementwise
        return True
    if isinstance(value, type):
        if issubclass(value, type) or issubclass(value, (logging.Handler, logging.Manager)):
            return True
        if isinstance(value, enum.EnumMeta) and len(value.__members__) == 0:
            return True
        return _top_package(value) in ("ctypes", "_ctypes")
    kind = type(value)
    if kind.__module__ == "builtins" and kind.__name__ in PIL_CORE_TYPES | {"PyCapsule"}:
        return True
    return _top_package(kind) in ("ctypes", "_ctypes")


def _top_package(cls: type) -> str:
    return str(getattr(cls, "__module__", None) or "").split(".")[0]


class PathPolicy:
    """Maps the paths the code names onto the session's files, and refuses everything else.

    Reads may reach the input copies (also under the original paths the caller gave) and the scratch dir; writes
    only the scratch dir. ``/mnt/data/temp_processed_images/`` and relative paths mean the scratch dir.
    """

    def __init__(self, scratch_dir: str, inputs: dict[str, str], max_pixels: int, max_scratch_bytes: int) -> None:
        self.max_scratch_bytes = max_scratch_bytes
        self.scratch = os.path.realpath(scratch_dir)
        self.inputs = {os.path.realpath(copy) for copy in inputs.values()}
        self.aliases = {original: copy for original, copy in inputs.items()}
        self.max_pixels = max_pixels

    def _map(self, path: Any) -> str:
        if isinstance(path, Path):
            path = str(path)
        if not isinstance(path, str):
            raise PolicyViolation(f"a file path must be a string, not {type(path).__name__}")
        if path in self.aliases:
            return self.aliases[path]
        alias = OUTPUT_ALIAS.rstrip("/")
        if path == alias or path.startswith(OUTPUT_ALIAS):
            path = self.scratch + path[len(alias):]
        return os.path.realpath(os.path.join(self.scratch, path))

    def inside_scratch(self, real: str) -> bool:
        return real == self.scratch or real.startswith(self.scratch + os.sep)

    def readable_or_file(self, target: Any) -> Any:
        """A path to read (checked), or an already open file object (which only a checked ``open`` can make)."""
        return target if _is_file_object(target) else self.readable(target)

    def writable_or_file(self, target: Any) -> Any:
        return target if _is_file_object(target) else self.writable(target)

    def readable(self, path: Any) -> str:
        """Returns the real path to read, or raises PolicyViolation naming what may be read."""
        real = self._map(path)
        if real in self.inputs or self.inside_scratch(real):
            return real
        raise PolicyViolation(
            f"reading {path!r} is not allowed: only the input image(s) and files under "
            f"{OUTPUT_ALIAS} can be read"
        )

    def writable(self, path: Any) -> str:
        """Returns the real path to write, or raises PolicyViolation naming where to write.

        A missing parent dir inside the scratch dir is created, as the original did for sub-dirs of
        ``/mnt/data/temp_processed_images/`` (the weights save to ``.../crops/a.png`` without ``makedirs``).
        """
        real = self._map(path)
        if self.inside_scratch(real) and real not in self.inputs:
            used = _disk_usage(self.scratch)
            if used > self.max_scratch_bytes:
                raise PolicyViolation(
                    f"the scratch dir already holds {used // 2**20} MiB, over the limit of "
                    f"{self.max_scratch_bytes // 2**20} MiB: save fewer or smaller files"
                )
            if not os.path.isdir(os.path.dirname(real)):  # the scratch dir's own parent is not the code's to touch
                os.makedirs(os.path.dirname(real), exist_ok=True)
            return real
        raise PolicyViolation(f"writing {path!r} is not allowed: save files under {OUTPUT_ALIAS}")

    def check_pixels(self, width: int, height: int, what: str) -> None:
        if width * height > self.max_pixels:
            raise PolicyViolation(
                f"{what} is {width}x{height} = {width * height} pixels, above the limit of {self.max_pixels}: "
                "work on a smaller region or resize it down"
            )

    def exists(self, path: Any) -> bool:
        try:
            return os.path.exists(self.readable(path))
        except PolicyViolation:
            return False


class ModuleFacade:
    """Stands for a module inside the sandbox: real attributes, minus the refused ones, plus confined overrides."""

    def __init__(self, name: str, module: ModuleType | None, overrides: dict[str, Any],
                 refuse: Callable[[str, Any], bool] | None = None, submodules: dict[str, ModuleFacade] | None = None,
                 exported: Iterable[str] | None = None) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_overrides", overrides)
        object.__setattr__(self, "_refuse", refuse)
        object.__setattr__(self, "_submodules", submodules or {})
        object.__setattr__(self, "_exported", frozenset(exported) if exported is not None else None)

    def __getattr__(self, attr: str) -> Any:
        if attr in self._overrides:
            return self._overrides[attr]
        if attr in self._submodules:
            return self._submodules[attr]
        refused = f"{self._name}.{attr} is not available in the sandbox"
        if attr.startswith("_") or self._module is None or (self._exported is not None and attr not in self._exported):
            raise AttributeError(refused)
        if attr not in vars(self._module) and hasattr(self._module, "__getattr__"):
            # a lazy attribute (numpy's testing, f2py, ctypeslib, ma...): refused without importing it, since the
            # import itself reads files and runs module code
            raise AttributeError(refused)
        value = getattr(self._module, attr)
        if is_unsafe_value(value) or (self._refuse is not None and self._refuse(attr, value)):
            raise AttributeError(refused)
        return value

    def __setattr__(self, attr: str, value: Any) -> None:
        raise PolicyViolation(f"{self._name} cannot be modified in the sandbox")

    def __dir__(self) -> list[str]:
        names = set(self._overrides) | set(self._submodules)
        if self._module is not None:
            names |= {n for n in dir(self._module) if not n.startswith("_")}
        return sorted(n for n in names if self._exported is None or n in self._exported or n in self._overrides)

    def __repr__(self) -> str:
        return f"<sandboxed module {self._name!r}>"


def build_modules(paths: PathPolicy) -> dict[str, Any]:
    """Everything ``import`` can return inside a session, keyed by top-level module name."""
    import cmath
    import collections
    import datetime
    import decimal
    import fractions
    import itertools
    import json
    import math
    import random
    import statistics
    import time

    # Every module is a facade, also the harmless ones: `from fractions import sys` reads an attribute of what
    # import returned without going through _getattr_, so the facade is where a module value must be refused.
    modules: dict[str, Any] = {}
    for module in (collections, datetime, decimal, fractions, itertools, json, math, random, statistics, time, cmath,
                   re):
        refused = STDLIB_REFUSED.get(module.__name__, frozenset())
        modules[module.__name__] = ModuleFacade(module.__name__, module, {}, refuse=lambda n, _v, r=refused: n in r)
    object.__getattribute__(modules["collections"], "_submodules")["abc"] = ModuleFacade(
        "collections.abc", collections.abc, {})
    modules["functools"] = ModuleFacade("functools", functools, {"wraps": _plain_wraps}, exported=FUNCTOOLS_NAMES)
    modules["string"] = ModuleFacade("string", string, {}, exported=STRING_NAMES)
    modules["uuid"] = ModuleFacade("uuid", uuid, {}, exported=UUID_NAMES)
    modules["os"] = _os_facade(paths)
    modules["cv2"] = _cv2_facade(paths)
    modules["numpy"] = _numpy_facade(paths)
    modules["PIL"] = _pil_facade(paths)
    return modules


def _plain_wraps(wrapped: Any, **options: Any) -> Callable[[Any], Any]:
    """``functools.wraps`` with its default attribute names only: ``assigned``/``updated`` would copy any named
    attribute, or a whole ``__dict__``, from one object to another."""
    if options:
        raise PolicyViolation("functools.wraps takes only the wrapped function in the sandbox (no assigned/updated)")

    def decorate(wrapper: Any) -> Any:
        return functools.update_wrapper(wrapper, wrapped, assigned=functools.WRAPPER_ASSIGNMENTS, updated=())

    return decorate


def confined_open(paths: PathPolicy) -> Callable[..., Any]:
    """``open`` for the sandbox: reads from the session, writes only under the scratch dir."""

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not isinstance(mode, str):
            raise PolicyViolation("open() mode must be a string")
        writing = any(flag in mode for flag in "wax+")
        real = paths.writable(file) if writing else paths.readable(file)
        return open(real, mode, *args, **kwargs)  # noqa: SIM115 - the caller owns the file object, as with open()

    return open_


def _os_facade(paths: PathPolicy) -> ModuleFacade:
    def makedirs(name: Any, mode: int = 0o777, exist_ok: bool = False) -> None:
        os.makedirs(paths.writable(name), exist_ok=exist_ok)

    def listdir(path: Any = ".") -> list[str]:
        return os.listdir(paths.readable(path))

    def isfile(path: Any) -> bool:
        return paths.exists(path) and os.path.isfile(paths.readable(path))

    def isdir(path: Any) -> bool:
        return paths.exists(path) and os.path.isdir(paths.readable(path))

    def getsize(path: Any) -> int:
        return os.path.getsize(paths.readable(path))

    pure = ("join", "basename", "dirname", "splitext", "split", "normpath", "sep", "extsep", "commonpath",
            "commonprefix", "isabs", "relpath")
    path_overrides: dict[str, Any] = {name: getattr(os.path, name) for name in pure}
    path_overrides.update(exists=paths.exists, isfile=isfile, isdir=isdir, getsize=getsize,
                          abspath=lambda p: os.path.join(paths.scratch, p))
    path_facade = ModuleFacade("os.path", None, path_overrides)
    overrides: dict[str, Any] = {
        "makedirs": makedirs, "mkdir": lambda p, mode=0o777: os.mkdir(paths.writable(p)), "listdir": listdir,
        "getcwd": lambda: paths.scratch, "sep": os.sep, "linesep": os.linesep, "environ": {},
    }
    return ModuleFacade("os", None, overrides, submodules={"path": path_facade})


def _refuse_cv2(name: str, value: Any) -> bool:
    """Whether a top-level cv2 name is refused: by the words in its name, or because it reaches a file.

    A function whose signature names a file, model or directory; a class whose constructor does (from the ``.pyi``
    stubs OpenCV ships: constructors have no docstring, ``FontFace(fontPathOrName)``) or one of whose methods does,
    other than the ``read``/``write``/``save``/``load`` family refused by name everywhere (``ANNIndex.
    setOnDiskBuild``); and every name of a family whose ``*_Params`` struct holds text fields (the model files of
    the dnn trackers: ``TrackerNano``, ``TrackerNano_create``, ``TrackerNano_Params``). Decided on access, so a
    session pays only for the names its code uses.
    """
    if isinstance(value, (int, float, str)):
        return False
    if any(word in name.lower() for word in CV2_REFUSED_WORDS) or cv2_takes_path(value):
        return True
    if name in cv2_path_constructors() or _family_params_hold_paths(name.split("_")[0]):
        return True
    return isinstance(value, type) and _class_method_takes_path(value)


@functools.cache
def _class_method_takes_path(cls: type) -> bool:
    return any(cv2_takes_path(getattr(cls, method, None)) for method in dir(cls)
               if not method.startswith("_") and not any(word in method.lower() for word in CV2_REFUSED_METHOD_WORDS))


@functools.cache
def _family_params_hold_paths(prefix: str) -> bool:
    import cv2

    params = getattr(cv2, f"{prefix}_Params", None)
    if not isinstance(params, type):
        return False
    try:
        instance = params()
    except Exception:  # noqa: BLE001 - a struct without a default constructor has no default paths to show
        return True
    return any(isinstance(getattr(instance, field, None), str) for field in dir(instance) if not field.startswith("_"))


_STUB_CLASS_OR_INIT = re.compile(r"^class (\w+)|^\s+def __init__\(self,?([^)]*)\)", re.MULTILINE)


@functools.cache
def cv2_path_constructors() -> frozenset[str]:
    """Names (``Class`` or ``sub_Class``) of cv2 classes whose constructor takes a file, from the ``.pyi`` stubs.

    Cached: the worker reads the stubs during its warm imports (see ``execution.py``), while they are readable;
    ``flann_Index`` is added, its index parameters can name a saved index file.
    """
    import cv2

    root = Path(os.path.dirname(cv2.__file__))
    found = {"flann_Index"}
    for stub in root.rglob("__init__.pyi"):
        prefix = "_".join(stub.parent.relative_to(root).parts)
        current = ""
        for match in _STUB_CLASS_OR_INIT.finditer(stub.read_text(errors="replace")):
            if match.group(1):
                current = f"{prefix}_{match.group(1)}" if prefix else match.group(1)
            elif current and any(CV2_PATH_PARAMETER.match(part.split(":")[0].strip().lstrip("*"))
                                 for part in match.group(2).split(",") if part.strip()):
                found.add(current)
    return frozenset(found)


def _cv2_facade(paths: PathPolicy) -> ModuleFacade:
    import cv2

    def imread(filename: Any, *args: Any) -> Any:
        real = paths.readable(filename)
        _check_image_header(paths, real)
        return cv2.imread(real, *args)

    def imreadmulti(filename: Any, *args: Any) -> Any:
        real = paths.readable(filename)
        _check_image_header(paths, real)
        return cv2.imreadmulti(real, *args)

    def imwrite(filename: Any, img: Any, *args: Any) -> bool:
        real = paths.writable(filename)
        shape = getattr(img, "shape", None)
        if shape is not None and len(shape) >= 2:
            paths.check_pixels(int(shape[1]), int(shape[0]), "the image to save")
        return bool(cv2.imwrite(real, img, *args))

    def flann_checked(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def confined(*args: Any, **kwargs: Any) -> Any:
            for params in (*args, *kwargs.values()):
                if isinstance(params, dict) and (params.get("algorithm") == CV2_FLANN_INDEX_SAVED
                                                 or any("file" in str(key).lower() for key in params)):
                    raise PolicyViolation("a FLANN index saved on disk (algorithm 254, 'filename') is not available "
                                          "in the sandbox: build the index from the descriptors")
            return function(*args, **kwargs)

        return confined

    overrides = {"imread": imread, "imreadmulti": imreadmulti, "imwrite": imwrite,
                 "FlannBasedMatcher": flann_checked(cv2.FlannBasedMatcher),
                 "FlannBasedMatcher_create": flann_checked(cv2.FlannBasedMatcher_create)}
    return ModuleFacade("cv2", cv2, overrides, refuse=_refuse_cv2)


def _numpy_facade(paths: PathPolicy) -> ModuleFacade:
    import numpy as np

    def load(file: Any, mmap_mode: Any = None, allow_pickle: bool = False, **kwargs: Any) -> Any:
        if allow_pickle:
            raise PolicyViolation("numpy.load(allow_pickle=True) is not allowed: pickles can run code")
        return np.load(paths.readable_or_file(file), allow_pickle=False, **kwargs)

    def writer(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def confined(file: Any, *args: Any, **kwargs: Any) -> Any:
            return function(paths.writable_or_file(file), *args, **kwargs)

        return confined

    def reader(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def confined(fname: Any, *args: Any, **kwargs: Any) -> Any:
            return function(paths.readable_or_file(fname), *args, **kwargs)

        return confined

    overrides: dict[str, Any] = {"load": load, "loadtxt": reader(np.loadtxt), "genfromtxt": reader(np.genfromtxt),
                                 "ndarray": ndarray_standin()}
    for name in ("save", "savez", "savez_compressed", "savetxt"):
        overrides[name] = writer(getattr(np, name))
    def frombuffer(buffer: Any, *args: Any, **kwargs: Any) -> Any:
        if holds_object_references(buffer):
            raise PolicyViolation("np.frombuffer over an array of Python objects is not available in the sandbox")
        return np.frombuffer(buffer, *args, **kwargs)

    overrides["frombuffer"] = frombuffer
    # chararray(buffer=...) is np.ndarray(buffer=...) again, without the stand-in's check
    submodules = {name: ModuleFacade(f"numpy.{name}", getattr(np, name), {},
                                     refuse=lambda attr, _v: attr == "chararray") for name in NUMPY_SUBMODULES}
    return ModuleFacade("numpy", np, overrides, refuse=lambda name, _v: name in NUMPY_REFUSED, submodules=submodules)


def holds_object_references(buffer: Any) -> bool:
    """Whether ``buffer`` is, or views, an array of Python objects.

    numpy exports such an array's memory as a plain *writable* buffer of pointers: a uint8 view over it
    (``np.frombuffer(a)``, ``np.ndarray(buffer=a)``, ``a.data``, ``f.readinto(a)``) writes forged object pointers.
    """
    import numpy as np

    if isinstance(buffer, memoryview):
        buffer = buffer.obj
    return isinstance(buffer, np.ndarray) and buffer.dtype.hasobject


@functools.cache
def ndarray_standin() -> type:
    """What ``np.ndarray`` and ``type(array)`` are in the sandbox: ``np.ndarray`` itself, except that its constructor
    refuses an object dtype over a ``buffer``.

    ``np.ndarray((1,), object, buffer=bytearray(8))`` is accepted by numpy and reads the bytes as object pointers:
    a forged pointer is a forged object, the end of every other guard. The stand-in is a real subclass (so
    ``class A(np.ndarray)``, ``view(A)`` and ``np.ndarray.tofile``'s refusal work as before) whose metaclass makes
    ``isinstance(x, np.ndarray)`` true for every array and builds plain arrays when called.
    """
    import numpy as np

    def checked(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments with the dtype converted once (a ``dtype`` property could answer differently twice)."""
        args, kwargs = list(args), dict(kwargs)
        if len(args) > 1:
            args[1] = dtype = np.dtype(args[1])
        else:
            kwargs["dtype"] = dtype = np.dtype(kwargs.get("dtype", float))
        buffer = kwargs.get("buffer", args[2] if len(args) > 2 else None)
        if buffer is not None and (dtype.hasobject or holds_object_references(buffer)):
            raise PolicyViolation("np.ndarray with an object dtype over a buffer, or over an array of Python "
                                  "objects, is not available in the sandbox")
        return tuple(args), kwargs

    class Checked(type):
        def __instancecheck__(cls, obj: Any) -> bool:
            return isinstance(obj, np.ndarray) if cls is standin else type.__instancecheck__(cls, obj)

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            args, kwargs = checked(args, kwargs)
            return np.ndarray(*args, **kwargs) if cls is standin else type.__call__(cls, *args, **kwargs)

    standin = Checked("ndarray", (np.ndarray,), {"__module__": "numpy", "__qualname__": "ndarray"})
    return standin


def _pil_facade(paths: PathPolicy) -> ModuleFacade:
    import importlib

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = paths.max_pixels

    def open_image(fp: Any, mode: str = "r", formats: Any = None) -> Any:
        if mode != "r":
            raise PolicyViolation("Image.open only reads (mode 'r')")
        return Image.open(paths.readable_or_file(fp), "r", formats)

    def font_reader(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def confined(font: Any = None, *args: Any, **kwargs: Any) -> Any:
            return function(paths.readable(font) if isinstance(font, (str, Path)) else font, *args, **kwargs)

        return confined

    submodules: dict[str, ModuleFacade] = {}
    for name in sorted(PIL_SUBMODULES):
        module = importlib.import_module(f"PIL.{name}")
        overrides: dict[str, Any] = {}
        if name == "Image":
            overrides["open"] = open_image
        if name == "ImageFont":
            overrides.update(truetype=font_reader(module.truetype), load=font_reader(module.load))
        refuse = None
        if name == "Image":
            refuse = lambda attr, value: not _pil_image_name(attr, value)  # noqa: E731
        elif name == "ImageFont":
            # load_path searches sys.path; FreeTypeFont(path) would open any file (truetype() is confined instead)
            refuse = lambda attr, _v: attr in {"load_path", "FreeTypeFont"}  # noqa: E731
        submodules[name] = ModuleFacade(f"PIL.{name}", module, overrides, refuse=refuse)
    _confine_freetype(paths)
    return ModuleFacade("PIL", None, {}, submodules=submodules)


def _pil_image_name(name: str, value: Any) -> bool:
    """The allow-list of ``PIL.Image``: the listed names, number and text constants, and enums."""
    if name in PIL_IMAGE_NAMES:
        return True
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return name.isupper()
    return isinstance(value, enum.EnumMeta) and len(value.__members__) > 0


def _confine_freetype(paths: PathPolicy) -> None:
    """Checks the font path wherever a ``FreeTypeFont`` is made: ``truetype()``, ``type(font)(path)``,
    ``font.font_variant(font=path)``. FreeType opens the file in C, out of reach of the audit hook (audit.py).

    The class is patched in place: the worker process serves this one session and is then thrown away.
    """
    from PIL import ImageFont

    original = ImageFont.FreeTypeFont.__init__
    original = getattr(original, "unconfined", original)

    @functools.wraps(original)
    def init(self: Any, font: Any = None, *args: Any, **kwargs: Any) -> None:
        if isinstance(font, (str, bytes, os.PathLike)):
            font = paths.readable(os.fsdecode(font))
        original(self, font, *args, **kwargs)

    init.unconfined = original  # type: ignore[attr-defined]
    ImageFont.FreeTypeFont.__init__ = init  # type: ignore[method-assign]


def _disk_usage(directory: str) -> int:
    """Bytes in the files under ``directory`` (a handful of images: cheap to walk on every write)."""
    total = 0
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            total += _disk_usage(entry.path)
        elif entry.is_file(follow_symlinks=False):
            total += entry.stat(follow_symlinks=False).st_size
    return total


def _is_file_object(target: Any) -> bool:
    """A real file object: ``io`` cannot be imported in the sandbox, so it came from the confined ``open``.

    A PathLike is never one: PIL and numpy would open its ``__fspath__`` instead of reading it.
    """
    import io

    return isinstance(target, io.IOBase) and not isinstance(target, os.PathLike)


def _check_image_header(paths: PathPolicy, real: str) -> None:
    """Refuses an image over the pixel limit before OpenCV decodes it (a cheap header read through PIL)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(real) as header:
            width, height = header.size
    except Image.DecompressionBombError as exc:
        raise PolicyViolation(f"image {os.path.basename(real)!r} is above the pixel limit: {exc}") from exc
    except (UnidentifiedImageError, OSError):
        return  # not an image PIL knows; OpenCV decides (and OPENCV_IO_MAX_IMAGE_PIXELS still bounds it)
    paths.check_pixels(width, height, f"image {os.path.basename(real)!r}")
