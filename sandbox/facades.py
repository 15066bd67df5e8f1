"""Facades over cv2, PIL, numpy and os whose file functions only reach the session's inputs and scratch dir.

RestrictedPython stops ``_``-names and raw ``__import__``, but the libraries the model needs are full of ways out:
``PIL.Image.os`` is the os module, ``cv2.imwrite`` writes anywhere, ``np.load(allow_pickle=True)`` runs pickles,
``cv2.VideoCapture`` opens devices and URLs (env-findings.md 6). A facade is what ``import cv2`` returns inside the
sandbox: attributes come from the real module, except that file functions are wrapped by :class:`PathPolicy`,
known ways out are refused by name, and any attribute that is itself a module is refused unless it is a listed
submodule (which gets its own facade). These run inside the worker process, which is the next layer out.
"""

from __future__ import annotations

import functools
import os
import re
import string
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from thyme.sandbox.errors import PolicyViolation
from thyme.sandbox.repair import OUTPUT_ALIAS

CV2_CONFINED_READS = ("imread", "imreadmulti")
CV2_CONFINED_WRITES = ("imwrite",)
# Substrings of cv2 names that open files, devices, windows or URLs; refused unless confined above.
CV2_REFUSED_WORDS = ("read", "write", "load", "save", "video", "capture", "cascade", "storage", "file", "window",
                     "mesh", "pointcloud", "config", "samples", "dnn", "dump", "facedetectoryn")
NUMPY_REFUSED = frozenset({"fromfile", "memmap", "fromregex", "DataSource", "tofile", "ctypeslib", "f2py", "testing",
                           "lib", "show_config", "show_runtime", "info", "test"})
# Not numpy.ma (ma.dump/ma.load pickle to and from files) nor numpy.rec (rec.fromfile).
NUMPY_SUBMODULES = frozenset({"linalg", "random", "fft", "polynomial", "emath", "char", "strings"})
PIL_SUBMODULES = frozenset({"Image", "ImageEnhance", "ImageFilter", "ImageOps", "ImageDraw", "ImageFont", "ImageStat",
                            "ImageChops", "ImageColor", "ImageSequence", "ImageTransform", "ExifTags"})
# Methods of library classes that touch files or spawn viewers, by the library whose class defines them; PIL's
# Image.save is confined instead (policy.py). For cv2 any method name containing one of the words is refused
# (Algorithm.save, FileStorage.write, dnn_Net.dumpToFile, HOGDescriptor.load, ...).
REFUSED_METHODS = {"numpy": frozenset({"tofile", "dump"}), "PIL": frozenset({"show"})}
CV2_REFUSED_METHOD_WORDS = ("file", "dump", "save", "write", "load", "read", "open")
STRING_NAMES = ("ascii_letters", "ascii_lowercase", "ascii_uppercase", "digits", "hexdigits", "octdigits",
                "punctuation", "printable", "whitespace", "capwords")
UUID_NAMES = ("uuid4", "uuid3", "uuid5", "UUID", "NAMESPACE_DNS", "NAMESPACE_URL", "NAMESPACE_OID", "NAMESPACE_X500")


def is_refused_method(library: str, name: str) -> bool:
    """Whether attribute ``name`` of a class from ``library`` (a top-level package name) is refused."""
    if library == "cv2":
        return any(word in name.lower() for word in CV2_REFUSED_METHOD_WORDS)
    return name in REFUSED_METHODS.get(library, ())


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
        value = getattr(self._module, attr)
        if isinstance(value, ModuleType) or (self._refuse is not None and self._refuse(attr, value)):
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

    modules: dict[str, Any] = {
        module.__name__: module
        for module in (collections, datetime, decimal, fractions, itertools, json, math, random, statistics, time,
                       cmath, re)
    }
    modules["functools"] = ModuleFacade("functools", functools, {}, exported=("reduce", "partial", "lru_cache",
                                                                             "cache", "cmp_to_key", "wraps"))
    modules["string"] = ModuleFacade("string", string, {}, exported=STRING_NAMES)
    modules["uuid"] = ModuleFacade("uuid", uuid, {}, exported=UUID_NAMES)
    modules["os"] = _os_facade(paths)
    modules["cv2"] = _cv2_facade(paths)
    modules["numpy"] = _numpy_facade(paths)
    modules["PIL"] = _pil_facade(paths)
    return modules


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
    if isinstance(value, (int, float, str)):
        return False
    return any(word in name.lower() for word in CV2_REFUSED_WORDS)


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

    overrides = {"imread": imread, "imreadmulti": imreadmulti, "imwrite": imwrite}
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

    overrides: dict[str, Any] = {"load": load, "loadtxt": reader(np.loadtxt), "genfromtxt": reader(np.genfromtxt)}
    for name in ("save", "savez", "savez_compressed", "savetxt"):
        overrides[name] = writer(getattr(np, name))
    submodules = {name: ModuleFacade(f"numpy.{name}", getattr(np, name), {}) for name in NUMPY_SUBMODULES}
    return ModuleFacade("numpy", np, overrides, refuse=lambda name, _v: name in NUMPY_REFUSED, submodules=submodules)


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
            refuse = lambda attr, _v: attr in {"register_open", "register_save", "init", "preinit"}  # noqa: E731
        elif name == "ImageFont":
            # load_path searches sys.path; FreeTypeFont(path) would open any file (truetype() is confined instead)
            refuse = lambda attr, _v: attr in {"load_path", "FreeTypeFont"}  # noqa: E731
        submodules[name] = ModuleFacade(f"PIL.{name}", module, overrides, refuse=refuse)
    return ModuleFacade("PIL", None, {}, submodules=submodules)


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
