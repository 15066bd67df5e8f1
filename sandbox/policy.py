"""The language policy: what the model's code may say, checked by RestrictedPython and a few guards.

RestrictedPython compiles the code so that attribute reads, item access, iteration, unpacking and ``print`` go
through the guard functions defined here, and names or attributes starting with ``_`` do not compile. On top:

- imports come from an allow-list and return facades (:mod:`thyme.sandbox.facades`), never real modules that
  reach os/sys;
- ``_getattr_`` refuses module objects, confines ``PIL.Image.Image.save`` to the scratch dir, refuses file methods
  of library objects (``ndarray.tofile``, ``Image.show``, cv2 ``Algorithm.save``) and turns ``str.format`` into a
  formatter whose fields go through the same guards (``"{0.__class__}".format(x)`` is a known escape);
- the builtins are a normal safe set, larger than the original's (``bool``, ``set``, ``getattr``, classes...);
- ``d['k'] += 1`` and ``obj.x += 1`` are rewritten to plain assignments first, since RestrictedPython refuses them.

This is a filter, not the security boundary: the worker process and its limits are (see ``worker.py``).
"""

from __future__ import annotations

import ast
import builtins
import operator
import re
import string
from collections.abc import Callable
from types import CodeType, ModuleType
from typing import Any

from RestrictedPython.compile import compile_restricted_exec
from RestrictedPython.Eval import default_guarded_getitem, default_guarded_getiter
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence, safe_builtins
from RestrictedPython.transformer import ALLOWED_FUNC_NAMES, INSPECT_ATTRIBUTES

from thyme.sandbox.errors import PolicyViolation
from thyme.sandbox.facades import (
    ModuleFacade,
    PathPolicy,
    holds_object_references,
    is_refused_method,
    is_unsafe_value,
    ndarray_standin,
)

ALLOWED_IMPORTS = frozenset({"cv2", "numpy", "PIL", "math", "cmath", "random", "re", "json", "collections",
                             "itertools", "functools", "statistics", "fractions", "decimal", "datetime", "time",
                             "string", "uuid", "os"})
"""Top-level modules the code may import; each maps to a facade or to a module without a way out."""

# The real range/list/tuple, not RestrictedPython's limited_builtins: its range refuses 1000+ elements (a loop over
# image rows) and its list refuses strings; memory and time are bounded by the worker's limits instead.
EXTRA_BUILTINS = ("range", "sorted", "max", "min", "sum", "zip", "enumerate", "map", "filter", "any", "all", "dict",
                  "set", "frozenset", "reversed", "type", "list", "tuple", "iter", "next", "format", "bytes",
                  "bytearray", "object", "property", "staticmethod", "classmethod", "super", "hasattr", "ascii", "bin",
                  "StopIteration", "ZeroDivisionError", "NotImplemented", "dir")
SANDBOX_MODULE_NAME = "__sandbox__"
ARRAY_PROTOCOL = ("__array_interface__", "__array_struct__")
"""numpy trusts what these say (a data address, or a buffer with a larger shape than it holds): a class made in
the sandbox may not define them, nor inherit a Python-level one (PIL's ``Image`` computes its own from ``size`` and
``tobytes``, which a subclass can override). numpy's own C-level ones, on ``ndarray``, stay."""
REFUSED_ATTRIBUTES = frozenset({"mro"})
"""``cls.mro()`` hands out base classes such as ``enum.Enum``, whose functional API builds a class from names."""
WRITES_INTO_BUFFER = re.compile(r"^(readinto\w*|\w+_into)$")
"""Methods that write bytes into a buffer the caller passes (``f.readinto(a)``, ``recv_into``, ``pack_into``): over an
array of Python objects, the bytes become object pointers. No image program needs them."""
_INPLACE_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv, "//=": operator.ifloordiv,
    "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift, ">>=": operator.irshift,
    "&=": operator.iand, "|=": operator.ior, "^=": operator.ixor, "@=": operator.imatmul,
}
_MISSING = object()


def compile_code(source: str, filename: str = "<code>") -> CodeType:
    """Compiles the model's code under the policy.

    Raises:
        SyntaxError: the code is not Python, or uses what the policy forbids at compile time (``_`` names, ``exec``).
    """
    tree = _AugmentedTargets().visit(ast.parse(source, filename))
    result = compile_restricted_exec(ast.unparse(ast.fix_missing_locations(tree)), filename)
    if result.errors or result.code is None:
        raise SyntaxError("; ".join(result.errors))
    return result.code


class _AugmentedTargets(ast.NodeTransformer):
    """``t[k] += v`` -> ``t[k] = t[k] + v`` (RestrictedPython only allows augmented assignment to plain names).

    The container expression is evaluated twice; for the subscripts and attributes model code uses this is the
    same object both times.
    """

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.stmt:
        if isinstance(node.target, ast.Name):
            return node
        load = ast.parse(ast.unparse(node.target), mode="eval").body
        value = ast.BinOp(left=load, op=node.op, right=node.value)
        return ast.copy_location(ast.Assign(targets=[node.target], value=value), node)


class PrintCollector:
    """The one stdout of a run: every ``print``, in any function, lands here, capped at ``limit`` characters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def __call__(self, _getattr: Any = None) -> PrintCollector:
        return self  # RestrictedPython calls _print_(_getattr_) once per scope; every scope shares this buffer

    def _call_print(self, *objects: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None,
                    flush: bool = False) -> None:
        separator = " " if sep is None else str(sep)
        text = separator.join(str(obj) for obj in objects) + ("\n" if end is None else str(end))
        if file is not None:  # print(..., file=f) with f from the confined open
            file.write(text)
            return
        room = self.limit - self.size
        if room > 0:
            self.parts.append(text[:room])
        self.size += min(len(text), max(room, 0))
        self.dropped += max(len(text) - max(room, 0), 0)

    def text(self) -> str:
        out = "".join(self.parts)
        if self.dropped:
            out += f"\n[stdout cut: {self.dropped} more characters not shown]"
        return out

    def reset(self) -> None:
        self.parts, self.size, self.dropped = [], 0, 0


class _SafeFormatter(string.Formatter):
    """``str.format`` whose ``{0.attr}`` and ``{0[key]}`` fields go through the guards."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, Any]:
        first, rest = _formatter_field_name_split(field_name)
        obj = self.get_value(first, args, kwargs)
        for is_attr, key in rest:
            obj = guarded_getattr(obj, key) if is_attr else default_guarded_getitem(obj, key)
        return obj, first


def _formatter_field_name_split(field_name: str) -> tuple[Any, Any]:
    import _string

    first, rest = _string.formatter_field_name_split(field_name)
    return first, rest


def _confined_save(paths: PathPolicy, image: Any) -> Callable[..., Any]:
    def save(fp: Any, format: Any = None, **params: Any) -> Any:
        width, height = image.size
        paths.check_pixels(width, height, "the image to save")
        return image.save(paths.writable_or_file(fp), format, **params)

    return save


def make_getattr(paths: PathPolicy) -> Callable[..., Any]:
    """The ``_getattr_`` guard (also the ``getattr`` builtin) of one session."""
    from PIL import Image

    def getattr_(obj: Any, name: str, default: Any = _MISSING) -> Any:
        try:
            return _guarded(obj, name)
        except AttributeError:
            if default is _MISSING:
                raise
            return default

    def _guarded(obj: Any, name: str) -> Any:
        if name in ("format", "format_map") and (isinstance(obj, str) or obj is str):
            return _safe_format(obj, name)
        if name == "save" and isinstance(obj, Image.Image):
            return _confined_save(paths, obj)
        if name == "save" and isinstance(obj, type) and issubclass(obj, Image.Image):
            return lambda image, *args, **kwargs: _confined_save(paths, image)(*args, **kwargs)
        value = guarded_getattr(obj, name)
        if name == "data" and isinstance(value, memoryview) and holds_object_references(value):
            raise PolicyViolation("the memory of an array of Python objects is not available in the sandbox")
        library = _defining_library(obj, name)
        if is_refused_method(library, name, value) or (library == "PIL" and name == "save"):
            # the last case: `super().save(...)` in a subclass of PIL's Image, which the branches above miss
            raise PolicyViolation(f"{_describe(obj)}.{name} is not available in the sandbox")
        return value

    return getattr_


def _safe_format(obj: Any, name: str) -> Callable[..., str]:
    """``str.format``/``format_map`` (bound, or unbound from the ``str`` class) through :class:`_SafeFormatter`."""
    formatter = _SafeFormatter()
    if obj is str:
        if name == "format":
            return lambda template, *args, **kwargs: formatter.vformat(template, args, kwargs)
        return lambda template, mapping: formatter.vformat(template, (), mapping)
    if name == "format":
        return lambda *args, **kwargs: formatter.vformat(obj, args, kwargs)
    return lambda mapping: formatter.vformat(obj, (), mapping)


def guarded_getattr(obj: Any, name: str) -> Any:
    """Refuses ``_`` names, frame/code introspection attributes and module values; else a plain ``getattr``.

    RestrictedPython's ``safer_getattr`` turns a missing attribute into ``None``; here AttributeError propagates,
    so a facade's refusal reaches the model with its reason.
    """
    if not isinstance(name, str):
        raise TypeError("attribute name must be a string")
    if (name.startswith("_") or name in INSPECT_ATTRIBUTES or name in REFUSED_ATTRIBUTES
            or WRITES_INTO_BUFFER.match(name)):
        raise PolicyViolation(f"attribute {name!r} is not available in the sandbox")
    if name in ("format", "format_map") and (isinstance(obj, str) or (isinstance(obj, type) and issubclass(obj, str))):
        raise PolicyViolation("str.format is only available on a string directly")
    value = getattr(obj, name)
    if isinstance(value, ModuleType):
        raise PolicyViolation(f"module attribute {_describe(obj)}.{name} is not available in the sandbox")
    if is_unsafe_value(value):
        raise PolicyViolation(f"{_describe(obj)}.{name} is not available in the sandbox")
    return value


def _defining_library(obj: Any, name: str) -> str:
    """The top-level package of the class that defines attribute ``name`` as ``obj`` would find it.

    Walks the MRO (of ``obj``'s class, of ``obj`` if it is a class, or past ``__thisclass__`` for ``super()``), so a
    sandbox-defined subclass of ``np.ndarray`` does not launder the inherited ``tofile``.
    """
    if isinstance(obj, super):
        self_class, this_class = getattr(obj, "__self_class__"), getattr(obj, "__thisclass__")  # noqa: B009
        mro = self_class.__mro__ if self_class is not None else ()
        classes = mro[mro.index(this_class) + 1:] if this_class in mro else mro
    elif isinstance(obj, type):
        classes = obj.__mro__
    else:
        classes = type(obj).__mro__
    for cls in classes:
        if name in vars(cls):
            return str(getattr(cls, "__module__", None) or "").split(".")[0]
    return ""


def _describe(obj: Any) -> str:
    if isinstance(obj, ModuleFacade):
        return str(object.__getattribute__(obj, "_name"))
    return str(getattr(obj, "__name__", type(obj).__name__))


def make_import(modules: dict[str, Any]) -> Callable[..., Any]:
    """The ``__import__`` of the sandbox: allow-listed top-level names, facades instead of modules."""

    def import_(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if isinstance(fromlist, list):
            # C code importing from the sandbox's frame (numpy's lazy `arr.mean()` helpers, datetime's strptime)
            # goes through PyImport_Import, which passes a list and then reads sys.modules itself, ignoring what
            # we return. Python's import statement passes a tuple or None, and sandbox code cannot call us.
            builtins.__import__(name, None, None, fromlist, level)
            return None
        top = name.split(".")[0]
        if level != 0 or top not in modules:
            allowed = ", ".join(sorted(ALLOWED_IMPORTS))
            raise ImportError(f"import of {name!r} is not allowed in the sandbox; allowed modules: {allowed}")
        module = modules[top]
        if fromlist or "." not in name:
            for part in name.split(".")[1:]:
                module = getattr(module, part)
            for item in fromlist or ():
                # `from M import x` reads x off the facade with a plain getattr; checked here first for a clear
                # message. The facade has no `__name__` on purpose: with one, the import statement would fall back
                # to sys.modules[f"{M}.{x}"] and hand out the real submodule (`from PIL import ImageFile`).
                if item != "*" and (not isinstance(item, str) or not hasattr(module, item)):
                    raise ImportError(f"cannot import name {item!r} from {name!r}: {name}.{item} is not available "
                                      "in the sandbox")
            return module
        # `import PIL.Image` binds `PIL`: check that the submodule exists in the facade first.
        target = module
        for part in name.split(".")[1:]:
            target = getattr(target, part)
        return module

    return import_


def refuse_write(obj: Any) -> Any:
    """The ``_write_`` guard: sandbox objects may be changed; modules, facades, library classes and PIL objects
    may not (a PIL image's ``tobytes``, ``filename`` or ``fp`` decide what its array view and its lazy load read)."""
    if isinstance(obj, (ModuleType, ModuleFacade)):
        raise PolicyViolation("modules cannot be modified in the sandbox")
    if isinstance(obj, type) and obj.__module__ != SANDBOX_MODULE_NAME:
        raise PolicyViolation(f"class {obj.__name__} cannot be modified in the sandbox")
    if any(str(getattr(cls, "__module__", "")).split(".")[0] == "PIL" for cls in type(obj).__mro__):
        raise PolicyViolation(f"attributes of a {type(obj).__name__} object cannot be set in the sandbox")
    return obj


def _class_namespace_key_allowed(key: Any) -> bool:
    """What a ``class`` statement may define is what ``type(name, bases, namespace)`` may."""
    return isinstance(key, str) and (not key.startswith("_") or key in ALLOWED_FUNC_NAMES
                                     or key in ("__module__", "__qualname__", "__doc__"))


def _check_new_class(cls: type) -> type:
    """Refuses a sandbox class that defines or inherits a Python-level numpy array protocol (see ARRAY_PROTOCOL)."""
    for base in cls.__mro__:
        for name in ARRAY_PROTOCOL:
            if name in vars(base) and type(vars(base)[name]).__name__ != "getset_descriptor":
                raise PolicyViolation(f"a class with {name} (defined by {base.__name__}) cannot be made in the "
                                      "sandbox")
    return cls


def _guarded_type(*args: Any, **kwargs: Any) -> Any:
    """``type``: one argument gives the class (but not a metaclass, nor the class of an any-attribute object);
    three make a class whose namespace obeys the ``class`` statement's rules."""
    if len(args) == 1 and not kwargs:
        kind = type(args[0])
        if kind is type:
            return _guarded_type
        if kind.__module__ == "numpy" and kind.__name__ == "ndarray":
            return ndarray_standin()
        if is_unsafe_value(kind):
            raise PolicyViolation(f"type() of a {kind.__name__} object is not available in the sandbox")
        return kind
    if len(args) != 3 or not isinstance(args[2], dict):
        raise TypeError("type() takes 1 or 3 arguments: type(object) or type(name, bases, namespace)")
    name, bases, namespace = args
    refused = sorted(str(key) for key in namespace if not _class_namespace_key_allowed(key))
    if refused:
        raise PolicyViolation(f"a class cannot define {', '.join(refused)} in the sandbox")
    namespace = dict(namespace)
    namespace.setdefault("__module__", SANDBOX_MODULE_NAME)
    return _check_new_class(type(name, bases, namespace, **kwargs))


def _guarded_build_class(function: Any, name: str, *bases: Any, **kwargs: Any) -> Any:
    """``__build_class__`` (the ``class`` statement), checked like ``type()``; ``metaclass=`` can only be ``type``."""
    metaclass = kwargs.get("metaclass", type)
    if metaclass is not type and metaclass is not _guarded_type:
        raise PolicyViolation("a metaclass cannot be given in the sandbox")
    kwargs["metaclass"] = type
    return _check_new_class(builtins.__build_class__(function, name, *bases, **kwargs))


def _real_classinfo(classinfo: Any) -> Any:
    if classinfo is _guarded_type:
        return type
    if isinstance(classinfo, tuple):
        return tuple(_real_classinfo(item) for item in classinfo)
    return classinfo


def _guarded_isinstance(obj: Any, classinfo: Any) -> bool:
    """``isinstance``, with the sandbox's ``type`` standing for the real one (``isinstance(C, type)``)."""
    return isinstance(obj, _real_classinfo(classinfo))


def _guarded_issubclass(cls: Any, classinfo: Any) -> bool:
    return issubclass(cls, _real_classinfo(classinfo))


def _guarded_apply(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``f(*args, **kwargs)``: keyword names from a dict obey the same ``_`` rule as written ones."""
    refused = sorted(key for key in kwargs if key.startswith("_"))
    if refused:
        raise PolicyViolation(f"keyword argument {refused[0]!r} is not available in the sandbox")
    return function(*args, **kwargs)


def make_globals(paths: PathPolicy, modules: dict[str, Any], collector: PrintCollector,
                 open_function: Callable[..., Any]) -> dict[str, Any]:
    """The one namespace of a session (globals and locals together, so functions see module variables)."""
    getattr_ = make_getattr(paths)
    names: dict[str, Any] = dict(safe_builtins)
    for name in EXTRA_BUILTINS:
        names[name] = getattr(builtins, name)
    names.update(
        __import__=make_import(modules), getattr=getattr_, open=open_function, _getattr_=getattr_,
        isinstance=_guarded_isinstance, issubclass=_guarded_issubclass, print=collector._call_print,
        type=_guarded_type, __build_class__=_guarded_build_class,
    )
    for name in ("setattr", "delattr"):
        names.pop(name, None)  # they bypass _write_; attribute assignment syntax is guarded instead
    for name in dir(builtins):
        value = getattr(builtins, name)
        if isinstance(value, type) and issubclass(value, BaseException) and not name.startswith("_"):
            names.setdefault(name, value)
    return {
        "__builtins__": names,
        "__name__": SANDBOX_MODULE_NAME,
        "__metaclass__": type,
        "_getattr_": getattr_,
        "_getitem_": default_guarded_getitem,
        "_getiter_": default_guarded_getiter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": refuse_write,
        "_inplacevar_": lambda op, x, y: _INPLACE_OPERATORS[op](x, y),
        "_apply_": _guarded_apply,
        "_print_": collector,
    }
