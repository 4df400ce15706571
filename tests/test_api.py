"""Pins the public surface of ds_trio: names, aliases, constants, exceptions."""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path

import pytest

import ds_trio
from ds_trio import DS

EXPECTED_ALL = [
    "ACCEPT_BACKOFF",
    "DS",
    "EPOLLET",
    "EPOLLEXCLUSIVE",
    "EPOLLIN",
    "EPOLLONESHOT",
    "EPOLLOUT",
    "LATER_DELAY",
    "AlreadyRegisteredError",
    "DSError",
    "DSStream",
    "DescriptorMap",
    "EventLoop",
    "Events",
    "Listener",
    "Loop",
    "LoopStatistics",
    "NotInLoopError",
    "Reset",
    "SetLoopTimeout",
    "SetPostLoopCallback",
    "Timer",
    "__version__",
    "add_timer",
    "add_uniq_timer",
    "awaitpid",
    "child_status",
    "current_loop",
    "descriptor_map",
    "dwaitpid",
    "event_loop",
    "expire_old",
    "graceful_shutdown",
    "in_loop",
    "later",
    "listen_fds",
    "loop",
    "now",
    "requeue",
    "reset",
    "serve",
    "set_loop_timeout",
    "set_post_loop_callback",
]


def test_all_is_the_pinned_sorted_list() -> None:
    assert ds_trio.__all__ == EXPECTED_ALL
    # The pinned list is isort-style sorted (constants, classes, functions).
    assert len(set(ds_trio.__all__)) == len(ds_trio.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_name_in_all_exists(name: str) -> None:
    assert hasattr(ds_trio, name)
    assert getattr(ds_trio, name) is not None


def test_star_import_exports_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from ds_trio import *", namespace)
    exported = {name for name in namespace if name != "__builtins__"}
    assert exported == set(EXPECTED_ALL)


def test_version_is_a_string() -> None:
    assert isinstance(ds_trio.__version__, str)
    assert ds_trio.__version__


@pytest.mark.parametrize(
    ("alias", "original"),
    [
        ("event_loop", "EventLoop"),
        ("reset", "Reset"),
        ("set_loop_timeout", "SetLoopTimeout"),
        ("set_post_loop_callback", "SetPostLoopCallback"),
        ("descriptor_map", "DescriptorMap"),
    ],
)
def test_snake_case_alias_is_the_same_object(alias: str, original: str) -> None:
    assert getattr(ds_trio, alias) is getattr(ds_trio, original)


@pytest.mark.parametrize(
    "name", ["EventLoop", "SetPostLoopCallback", "SetLoopTimeout", "Reset"]
)
def test_ds_class_method_is_the_module_function(name: str) -> None:
    assert getattr(DS, name) is getattr(ds_trio, name)


def test_ds_requeue_is_the_module_requeue() -> None:
    assert DS.requeue is ds_trio.requeue


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EPOLLIN", 1),
        ("EPOLLOUT", 4),
        ("EPOLLEXCLUSIVE", 1 << 28),
        ("EPOLLONESHOT", 1 << 30),
        ("EPOLLET", 1 << 31),
    ],
)
def test_epoll_constant_has_the_linux_value_and_is_an_events_member(
    name: str, value: int
) -> None:
    constant = getattr(ds_trio, name)
    assert constant == value
    assert int(constant) == value
    assert isinstance(constant, ds_trio.Events)
    assert constant is ds_trio.Events[name]


def test_epoll_constants_combine_as_flags() -> None:
    mask = ds_trio.EPOLLIN | ds_trio.EPOLLONESHOT
    assert isinstance(mask, ds_trio.Events)
    assert int(mask) == (1 | 1 << 30)


@pytest.mark.parametrize(
    "method",
    [
        "event_step",
        "close",
        "do_read",
        "rbuf_idle",
        "drop",
        "epwait",
        "shutdn",
        "requeue",
    ],
)
def test_legacy_ds_method_exists(method: str) -> None:
    attr: Callable[..., object] = getattr(DS, method)
    assert callable(attr)


def test_not_in_loop_error_is_a_runtime_error_and_a_ds_error() -> None:
    assert issubclass(ds_trio.NotInLoopError, RuntimeError)
    assert issubclass(ds_trio.NotInLoopError, ds_trio.DSError)


def test_already_registered_error_is_a_value_error_and_a_ds_error() -> None:
    assert issubclass(ds_trio.AlreadyRegisteredError, ValueError)
    assert issubclass(ds_trio.AlreadyRegisteredError, ds_trio.DSError)


def test_ds_error_is_an_exception() -> None:
    assert issubclass(ds_trio.DSError, Exception)


def test_in_loop_is_false_outside_a_loop() -> None:
    assert ds_trio.in_loop() is False


def test_now_outside_a_loop_raises_not_in_loop_error() -> None:
    with pytest.raises(ds_trio.NotInLoopError):
        ds_trio.now()


def test_current_loop_outside_a_loop_raises_not_in_loop_error() -> None:
    with pytest.raises(ds_trio.NotInLoopError):
        ds_trio.current_loop()


def test_py_typed_ships_in_the_package() -> None:
    package_dir = Path(ds_trio.__file__).parent
    assert (package_dir / "py.typed").is_file()
    assert importlib.resources.files("ds_trio").joinpath("py.typed").is_file()
