"""One test per escape route: each asserts that the EFFECT did not happen (no sentinel file, no secret printed,
input unchanged, call returned in time), not only that an error string appeared.

Escapes run in one shared session (a refused escape leaves the worker usable); resource bombs get their own
session since most of them end with the worker killed. The process layer alone (no RestrictedPython) is proven in
test_ablation.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from thyme.sandbox import Limits, Sandbox, Session

SECRET = "thyme-secret-" + uuid.uuid4().hex
TIMEOUT_S = 2.5
RETURN_MARGIN_S = 20.0  # "returned in time": generous, the CI machine is shared


@pytest.fixture(scope="module")
def strict() -> Iterator[Sandbox]:
    os.environ["THYME_TEST_API_TOKEN"] = SECRET  # a secret in the parent's environment, which workers must not see
    try:
        limits = Limits(timeout_s=TIMEOUT_S, max_stdout_chars=2000, max_pixels=4_000_000, memory_mb=1024,
                        scratch_mb=200)
        with Sandbox(limits=limits, pool_size=1) as sb:
            yield sb
    finally:
        del os.environ["THYME_TEST_API_TOKEN"]


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "secret.txt"
    path.write_text(SECRET)
    path.chmod(0o644)
    path.parent.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def shared(strict: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Session, Path]]:
    import numpy as np
    from PIL import Image

    image = tmp_path_factory.mktemp("input") / "in.png"
    Image.fromarray(np.full((80, 120, 3), 200, np.uint8)).save(image)
    with strict.session(image=str(image), item_id="sec") as session:
        yield session, image


@pytest.fixture
def sentinel() -> Iterator[Path]:
    """A path in world-writable /tmp: only the sandbox's layers keep the code from creating it."""
    path = Path("/tmp") / f"thyme-sentinel-{uuid.uuid4().hex}"
    yield path
    if path.exists():
        path.unlink()


def _run(session: Session, code: str) -> tuple[object, float]:
    start = time.monotonic()
    result = session.run(code)
    return result, time.monotonic() - start


# --- dunders and introspection ------------------------------------------------------------------------------------
INTROSPECTION = {
    "subclasses": "for c in ().__class__.__bases__[0].__subclasses__():\n"
                  "    if c.__name__ == 'catch_warnings':\n"
                  "        c()._module.__builtins__['open']('{sentinel}', 'w').write('x')",
    "function_globals": "def f():\n    pass\nf.__globals__['__builtins__']['open']('{sentinel}', 'w')",
    "getattr_dunder": "def f():\n    pass\ng = getattr(f, '__glob' + 'als__')\n"
                      "g['__builtins__']['open']('{sentinel}', 'w')",
    "library_function_globals": "import cv2\nos_ = getattr(getattr(cv2.resize, '__self__'), 'os')\n"
                                "os_.system('touch {sentinel}')",
    "format_string_globals": "from PIL import Image\n"
                             "s = '{{0.__init__.__globals__[os].system}}'.format(Image.Image)\nprint(s)\n"
                             "open('{sentinel}', 'w')",
    "format_map": "print('{{x.__class__.__mro__}}'.format_map({{'x': 1}}))\nopen('{sentinel}', 'w')",
    "generator_frame": "def g():\n    yield 1\nit = g()\nfr = getattr(it, 'gi' + '_frame')\n"
                       "fr.f_back.f_globals['__builtins__']['open']('{sentinel}', 'w')",
    "traceback_frame": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
                       "    e.__traceback__.tb_frame.f_globals['__builtins__']['open']('{sentinel}', 'w')",
    "builtins_name": "__builtins__['open']('{sentinel}', 'w')",
    "import_dunder": "__import__('os').system('touch {sentinel}')",
    "exec_eval": "exec(\"open('{sentinel}', 'w')\")",
    "globals_builtin": "globals()['__builtins__']",
    "type_mro_object": "base = type(1).mro()[-1]\nfor c in getattr(base, '__subcl' + 'asses__')():\n    print(c)\n"
                       "open('{sentinel}', 'w')",
    "setattr_library_class": "from PIL import Image\nImage.Image.save = print\nopen('{sentinel}', 'w')",
}


@pytest.mark.parametrize("name", sorted(INTROSPECTION))
def test_introspection_escape_blocked(shared, sentinel: Path, name: str) -> None:
    session, _ = shared
    result, _ = _run(session, INTROSPECTION[name].format(sentinel=sentinel))
    assert not sentinel.exists()
    assert not result.ok and result.error.startswith("Sandbox for sec: ")
    assert "__init__.__globals__" not in result.stdout and "<built-in function system>" not in result.stdout


# --- module attributes and indirect imports -----------------------------------------------------------------------
MODULE_ROUTES = {
    "pil_image_os": "from PIL import Image\nImage.os.system('touch {sentinel}')",
    "pil_image_sys": "from PIL import Image\nImage.sys.modules['os'].system('touch {sentinel}')",
    "pil_image_builtins": "from PIL import Image\nImage.builtins.open('{sentinel}', 'w')",
    "cv2_os": "import cv2\ncv2.os.system('touch {sentinel}')",
    "numpy_lib": "import numpy as np\nnp.lib.npyio.os.system('touch {sentinel}')",
    "numpy_ctypeslib": "import numpy as np\nnp.ctypeslib.ctypes.CDLL(None).system(b'touch {sentinel}')",
    "numpy_testing": "import numpy as np\nnp.testing.os.system('touch {sentinel}')",
    "json_decoder": "import json\njson.decoder.re.sys.modules['os'].system('touch {sentinel}')",
    "getattr_module": "import cv2\ngetattr(cv2, 'os').system('touch {sentinel}')",
    "from_pil_import_os": "from PIL.Image import os\nos.system('touch {sentinel}')",
    "os_path_os": "import os.path\nos.path.os.system('touch {sentinel}')",
    "facade_setattr": "import os\nos.system = 1\nopen('{sentinel}', 'w')",
    "string_formatter": "import string\nstring.Formatter().format('{{0.__globals__}}', print)\n"
                        "open('{sentinel}', 'w')",
    "uuid_os": "import uuid\nuuid.os.system('touch {sentinel}')",
}
IMPORTS = ("os; os.system", "importlib; importlib.import_module('os').system", "subprocess; subprocess.run",
           "sys; sys.modules['os'].system", "builtins; builtins.open", "ctypes; ctypes.CDLL(None).system",
           "posix; posix.system", "shutil; shutil.os.system", "pty; pty.spawn", "socket; socket.socket",
           "multiprocessing; multiprocessing.Process", "pickle; pickle.loads")


@pytest.mark.parametrize("name", sorted(MODULE_ROUTES))
def test_module_attribute_escape_blocked(shared, sentinel: Path, name: str) -> None:
    session, _ = shared
    result, _ = _run(session, MODULE_ROUTES[name].format(sentinel=sentinel))
    assert not sentinel.exists()
    assert not result.ok


@pytest.mark.parametrize("route", IMPORTS)
def test_indirect_import_blocked(shared, sentinel: Path, route: str) -> None:
    session, _ = shared
    module, call = route.split("; ")
    code = f"import {module}\n{call}('touch {sentinel}')\nopen('{sentinel}', 'w')"
    result, _ = _run(session, code)
    assert not sentinel.exists()
    assert not result.ok
    assert module in result.error  # the error names what was refused


# --- files outside the session ---------------------------------------------------------------------------------
READS = {
    "open": "print(open('{path}').read())",
    "cv2_imread": "import cv2\nprint(cv2.imread('{path}', cv2.IMREAD_UNCHANGED).tobytes())",
    "pil_open": "from PIL import Image\nprint(Image.open('{path}').tobytes())",
    "np_loadtxt": "import numpy as np\nprint(np.loadtxt('{path}', dtype=str))",
    "np_fromfile": "import numpy as np\nprint(np.fromfile('{path}', dtype='uint8').tobytes())",
    "np_load_pickle": "import numpy as np\nprint(np.load('{path}', allow_pickle=True))",
    "relative_traversal": "print(open('../../../../../../../..{path}').read())",
    "alias_traversal": "print(open('/mnt/data/temp_processed_images/../../../../../../..{path}').read())",
    "listdir": "import os\nprint(os.listdir('{dir}'))\nprint(open(os.path.join('{dir}', 'secret.txt')).read())",
    "font": "from PIL import ImageFont\nprint(ImageFont.truetype('{path}'))",
    "json": "import json\nprint(json.load(open('{path}')))",
}


@pytest.mark.parametrize("name", sorted(READS))
def test_read_outside_session_blocked(shared, secret_file: Path, name: str) -> None:
    session, _ = shared
    result, _ = _run(session, READS[name].format(path=secret_file, dir=secret_file.parent))
    assert SECRET not in result.stdout
    assert "secret.txt" not in result.stdout
    assert not result.ok


WRITES = {
    "open": "open('{path}', 'w').write('x')",
    "cv2_imwrite": "import cv2, numpy as np\ncv2.imwrite('{path}.png', np.zeros((4, 4), np.uint8))",
    "pil_save": "from PIL import Image\nImage.new('L', (4, 4)).save('{path}.png')",
    "pil_save_via_class": "from PIL import Image\nImage.Image.save(Image.new('L', (4, 4)), '{path}.png')",
    "np_save": "import numpy as np\nnp.save('{path}.npy', np.zeros(3))",
    "np_savetxt": "import numpy as np\nnp.savetxt('{path}.txt', np.zeros(3))",
    "ndarray_tofile": "import numpy as np\nnp.zeros(3).tofile('{path}')",
    "ndarray_tofile_via_class": "import numpy as np\nnp.ndarray.tofile(np.zeros(3), '{path}')",
    "os_makedirs": "import os\nos.makedirs('{path}')",
    "cv2_algorithm_save": "import cv2\ncv2.createCLAHE().save('{path}')",
    "cv2_videowriter": "import cv2\ncv2.VideoWriter('{path}.avi', 0, 1.0, (4, 4))",
    "alias_traversal": "open('/mnt/data/temp_processed_images/../../../../../../..{path}', 'w')",
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_write_outside_session_blocked(shared, sentinel: Path, name: str) -> None:
    session, _ = shared
    result, _ = _run(session, WRITES[name].format(path=sentinel))
    for suffix in ("", ".png", ".npy", ".txt", ".avi"):
        assert not Path(f"{sentinel}{suffix}").exists()
    assert not result.ok


INPUT_WRITES = ("import cv2, numpy as np\ncv2.imwrite(image_path, np.zeros((8, 8, 3), np.uint8))",
                "open(image_path, 'wb').write(b'x')",
                "from PIL import Image\nImage.new('RGB', (8, 8)).save(image_path)",
                "open('{original}', 'wb').write(b'x')",
                "import cv2, numpy as np\ncv2.imwrite('{original}', np.zeros((8, 8, 3), np.uint8))")


@pytest.mark.parametrize("code", INPUT_WRITES)
def test_input_image_cannot_be_modified(shared, code: str) -> None:
    session, original = shared
    digest = hashlib.sha256(original.read_bytes()).hexdigest()
    copy = Path(session.input_paths[0])
    copy_digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    result, _ = _run(session, code.format(original=original))
    assert not result.ok
    assert hashlib.sha256(original.read_bytes()).hexdigest() == digest
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == copy_digest
    assert os.stat(original).st_mode & 0o222, "the caller's file must not be chmod-ed"


def test_raw_bytes_bomb_or_fake_image_is_not_returned_as_image(shared) -> None:
    import io

    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, "PNG")  # 25 MP, a few KB: over the 4 MP limit of this sandbox
    session, _ = shared
    code = (f"open('/mnt/data/temp_processed_images/bomb.png', 'wb').write({bomb.getvalue()!r})\n"
            "print('/mnt/data/temp_processed_images/bomb.png')")
    result = session.run(code)
    assert result.images == [] and not result.ok
    assert "'bomb.png' is 5000x5000, more pixels than the limit of 4000000" in result.error
    fake = session.run("open('/mnt/data/temp_processed_images/f.png', 'w').write('no')\n"
                       "print('/mnt/data/temp_processed_images/f.png')")
    assert fake.images == [] and "is not a readable image" in fake.error


def test_printed_paths_outside_session_are_not_images(shared, tmp_path: Path) -> None:
    from PIL import Image

    outside = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    session, _ = shared
    result = session.run(f"print('{outside}')\nprint(image_path)\nprint('/etc/hostname.png')")
    assert result.images == []
    assert str(outside) in result.stdout


# --- environment secrets ---------------------------------------------------------------------------------------
ENV_READS = ("import os\nprint(os.environ)",
             "import os\nprint(os.environ.get('THYME_TEST_API_TOKEN'))",
             "print(open('/proc/self/environ').read())",
             "print(open('/proc/1/environ').read())")


@pytest.mark.parametrize("code", ENV_READS)
def test_environment_secret_not_visible(shared, code: str) -> None:
    session, _ = shared
    result = session.run(code)
    assert SECRET not in result.stdout
    assert SECRET not in (result.error or "")


def test_worker_process_environment_has_no_inherited_secret(shared) -> None:
    session, _ = shared
    session.run("x = 1")
    environ = Path(f"/proc/{session._worker.pid}/environ").read_bytes()  # the parent (root) may read it
    assert SECRET.encode() not in environ
    assert b"THYME_TEST_API_TOKEN" not in environ


# --- processes and network -------------------------------------------------------------------------------------
PROCESS_ROUTES = ("import os\nos.fork()", "import os\nos.system('touch {sentinel}')",
                  "import os\nos.popen('touch {sentinel}')",
                  "import os\nos.spawnl(0, '/bin/touch', 'touch', '{sentinel}')",
                  "import os\nos.execv('/bin/touch', ['touch', '{sentinel}'])",
                  "from PIL import Image\nImage.new('RGB', (4, 4)).show()",
                  "import uuid\nuuid.uuid1()")


@pytest.mark.parametrize("code", PROCESS_ROUTES)
def test_no_new_processes(shared, sentinel: Path, code: str) -> None:
    session, _ = shared
    result = session.run(code.format(sentinel=sentinel))
    assert not result.ok
    assert not sentinel.exists()
    children = Path(f"/proc/{session._worker.pid}/task/{session._worker.pid}/children").read_text().split()
    assert children == []


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, list[object]]]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server, accepted
    stop.set()
    thread.join(timeout=2)
    server.close()


SOCKET_ROUTES = ("import socket\ns = socket.create_connection(('127.0.0.1', {port}))",
                 "import cv2\ncv2.VideoCapture('http://127.0.0.1:{port}/x.mjpg')",
                 "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/')",
                 "from PIL import Image\nImage.open('http://127.0.0.1:{port}/x.png')")


@pytest.mark.parametrize("code", SOCKET_ROUTES)
def test_no_network_connections(shared, listener, code: str) -> None:
    server, accepted = listener
    session, _ = shared
    result = session.run(code.format(port=server.getsockname()[1]))
    time.sleep(0.3)
    assert not result.ok
    assert accepted == []


# --- resource bombs ----------------------------------------------------------------------------------------------
BOMBS = {
    "endless_loop": "while True:\n    pass",
    "swallowed_timeout": "while True:\n    try:\n        sum(range(10**6))\n    except BaseException:\n        pass",
    "sleep": "import time\ntime.sleep(3600)",
    "huge_allocation": "import numpy as np\na = np.ones((50000, 50000))",
    "huge_string": "s = 'x' * (10 ** 11)",
    "gradual_memory": "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))",
    "deep_recursion": "def f(n):\n    return f(n + 1)\nf(0)",
    "deeply_nested_source": "x = " + "[" * 5000 + "]" * 5000,
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "print_flood": "while True:\n    print('flood' * 1000)",
    "huge_image_write": "import numpy as np, cv2\nok = cv2.imwrite('big.png', np.zeros((3000, 3000), np.uint8))",
    "disk_filling": "block = b'x' * (50 * 2 ** 20)\nfor i in range(1000):\n    open(f'f{i}.bin', 'wb').write(block)",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_resource_bomb_returns_in_time_and_next_session_works(strict: Sandbox, name: str, small_image: Path) -> None:
    with strict.session(image=str(small_image), item_id="bomb") as session:
        result, elapsed = _run(session, BOMBS[name])
        assert elapsed < TIMEOUT_S + RETURN_MARGIN_S
        assert not result.ok and result.error.startswith("Sandbox for bomb: ")
        assert len(result.stdout) <= 2000 + 100
        assert not (session.scratch_dir / "big.png").exists()
        assert sum(f.stat().st_size for f in session.scratch_dir.rglob("*")) <= (200 + 50) * 2**20
    with strict.session(image=str(small_image)) as fresh:
        assert fresh.run("print(6 * 7)").stdout == "42\n"


def test_print_flood_without_loop_is_capped(shared) -> None:
    session, _ = shared
    result = session.run("print('y' * 10 ** 7)")
    assert result.ok
    assert result.stdout.startswith("y" * 1000)
    assert len(result.stdout) < 2100
    assert result.stdout.rstrip().endswith("more characters not shown]")


LAUNDERED = {
    "ndarray_subclass_tofile": "import numpy as np\nclass A(np.ndarray):\n    pass\n"
                               "np.zeros(3).view(A).tofile('{sentinel}')",
    "super_tofile": "import numpy as np\nclass A(np.ndarray):\n    def go(self, p):\n"
                    "        return super().tofile(p)\nnp.zeros(3).view(A).go('{sentinel}')",
    "pil_subclass_super_save": "from PIL import Image\nclass I(Image.Image):\n    def go(self, p):\n"
                               "        return super().save(p, 'PNG')\nim = I()\nim.go('{sentinel}')",
    "str_class_format": "print(str.format('{{0.__class__}}', 1))\nopen('{sentinel}', 'w')",
    "getattr_str_format": "f = getattr(str, 'format_map')\nprint(f('{{x.__class__}}', {{'x': 1}}))\n"
                          "open('{sentinel}', 'w')",
    "pathlike_file_object": "from PIL import Image\nF = type(open(image_path, 'rb'))\nclass P(F):\n"
                            "    def __fspath__(self):\n        return '{sentinel}'\n"
                            "Image.new('L', (4, 4)).save(P(image_path, 'rb'), 'PNG')",
    "pathlike_made_with_type": "from PIL import Image\nf = open(image_path, 'rb')\n"
                               "P = type('P', (type(f),), {{'__fspath__': lambda self: '{sentinel}'}})\n"
                               "Image.new('L', (4, 4)).save(P(f.raw), 'PNG')",
    "cv2_dnn_dump": "import cv2\nnet = cv2.dnn_Net()\nnet.dumpToFile('{sentinel}')",
    "cv2_algorithm_write": "import cv2\ncv2.ORB_create().write('{sentinel}')",
}


@pytest.mark.parametrize("name", sorted(LAUNDERED))
def test_file_methods_cannot_be_laundered_through_subclasses_super_or_classes(shared, sentinel: Path,
                                                                            name: str) -> None:
    session, _ = shared
    result = session.run(LAUNDERED[name].format(sentinel=sentinel))
    assert not sentinel.exists()
    assert not result.ok
    assert "<class 'int'>" not in result.stdout
