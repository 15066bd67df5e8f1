"""A remote pool over two real servers on loopback: sessions are spread, stay on their server, and a dead server's
sessions fail cleanly while the others go on."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.fixtures.sandbox_server import free_port, running_server
from thyme.sandbox import InvalidInput, Sandbox, SandboxError
from thyme.sandbox.remote import RemoteSandbox
from thyme.sandbox.server.errors import ServerUnreachable


def test_sessions_spread_over_two_servers_and_survive_one_dying(small_image: Path) -> None:
    with contextlib.ExitStack() as stack:
        url_a = stack.enter_context(running_server(workers=1))
        server_b = running_server(workers=1)
        url_b = server_b.__enter__()
        try:
            pool = stack.enter_context(Sandbox(url=[url_a, url_b]))
            assert isinstance(pool, RemoteSandbox) and pool.urls == [url_a, url_b]
            sessions = [pool.session(image=str(small_image), item_id=f"s{i}") for i in range(4)]
            assert sorted(s.url for s in sessions) == sorted([url_a, url_a, url_b, url_b])
            for index, session in enumerate(sessions):
                assert session.run(f"n = {index}").ok
            assert pool.health(url=url_a)["sessions_open"] == pool.health(url=url_b)["sessions_open"] == 2
        finally:
            server_b.__exit__(None, None, None)  # server B goes away with two sessions on it

        for index, session in enumerate(sessions):
            if session.url == url_a:
                assert session.run("print(n)").stdout == f"{index}\n"  # variables still there: never moved
            else:
                with pytest.raises(ServerUnreachable) as lost:
                    session.run("print(n)")
                assert isinstance(lost.value, SandboxError)
                assert f"cannot reach the sandbox server at {url_b}" in str(lost.value)
                assert f"Session {session.session_id} lived on that server and is lost" in str(lost.value)
        fresh = [pool.session(image=str(small_image)) for _ in range(2)]
        assert {s.url for s in fresh} == {url_a}  # B refused a connection: new sessions go to A
        assert fresh[0].run("print('on a')").stdout == "on a\n"
        for session in sessions + fresh:
            session.close()  # the lost ones too, without raising
        assert pool.health(url=url_a)["sessions_open"] == 0


def test_all_servers_down_is_one_clear_error(small_image: Path) -> None:
    urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    with RemoteSandbox(urls) as pool, pytest.raises(ServerUnreachable) as down:
        pool.session(image=str(small_image))
    assert str(down.value).startswith("none of the 2 sandbox servers could be reached: ")
    assert all(url in str(down.value) for url in urls)


def test_pool_urls_are_checked() -> None:
    with pytest.raises(InvalidInput, match="pass at least one sandbox server URL"):
        RemoteSandbox([])
    with pytest.raises(InvalidInput, match="repeat"):
        RemoteSandbox(["http://127.0.0.1:1", "http://127.0.0.1:1/"])
    with pytest.raises(InvalidInput, match="must start with http"):
        RemoteSandbox(["http://127.0.0.1:1", "127.0.0.1:2"])
