"""The server's start-up path does not import what it does not need before serving."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

from azolla.app import server_main
from azolla.app._imports import without

pytestmark = pytest.mark.timeout(120)


def test_without_hides_a_package_for_the_block_only() -> None:
    name = "azolla_test_package_that_does_not_exist"
    with without(name, "json"), pytest.raises(ImportError):
        __import__(name)
    assert name not in sys.modules
    assert sys.modules["json"] is json  # already imported: left alone


def test_without_hides_a_real_package() -> None:
    code = ("import sys\n"
            "from azolla.app._imports import without\n"
            "with without('colorsys'):\n"
            "    try:\n"
            "        import colorsys\n"
            "        hidden = False\n"
            "    except ImportError:\n"
            "        hidden = True\n"
            "import colorsys\n"
            "print(hidden, colorsys.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["True", "colorsys"]


def test_server_start_path_skips_optional_heavy_imports() -> None:
    # What azolla-server imports before it serves, with JSON logs and metrics off: the
    # settings, structlog, the container and everything it wires.
    code = ("import sys\n"
            "import azolla.app.server_main as m\n"
            "m._import_structlog('json')\n"
            "from azolla.app.logging import configure_logging\n"
            "configure_logging('json', 'warning')\n"
            "import azolla.app.containers\n"
            "import azolla.adapters.postgres.event_store\n"
            "import json\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = set(json.loads(out))
    assert "structlog" in loaded  # the test is real
    assert "dependency_injector" in loaded
    assert loaded.isdisjoint({"rich", "colorama", "yaml", "prometheus_client",
                              "pydantic_settings"}), loaded


def test_main_turns_garbage_collection_back_on_when_it_does_not_serve() -> None:
    assert gc.isenabled()
    with pytest.raises(SystemExit) as exit_info:
        server_main.main(["--port", "not-a-number"])
    assert exit_info.value.code == 2
    assert gc.isenabled()


def test_garbage_collection_resumes_with_the_start_up_objects_frozen() -> None:
    thresholds = gc.get_threshold()
    server_main._pause_gc()
    try:
        assert not gc.isenabled()
        server_main._resume_gc(object())  # what serve() calls once it serves
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == server_main.SERVING_GC_THRESHOLD
    finally:
        gc.unfreeze()
        gc.enable()
        gc.set_threshold(*thresholds)


def test_the_version_is_looked_up_only_when_asked(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []

    def version() -> str:
        calls.append("version")
        return "9.8.7"

    monkeypatch.setattr(server_main, "_version", version)
    server_main.build_parser().parse_args(["--port", "1"])
    assert calls == []
    with pytest.raises(SystemExit) as exit_info:
        server_main.build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == "azolla-server 9.8.7\n"
    assert calls == ["version"]
