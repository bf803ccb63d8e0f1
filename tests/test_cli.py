"""``asgi-armor`` commands, in-process (serving is covered in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from asgi_armor.cli import main
from asgi_armor.demo.app import BUNDLED_CONFIG


def test_help_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for word in ("demo", "run", "check", "rate limits", "examples"):
        assert word in out


@pytest.mark.parametrize("command", ["demo", "run", "check"])
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "usage: asgi-armor " + command in capsys.readouterr().out


def test_check_prints_the_stack(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ARMOR_DEMO_WEBHOOK_SECRET", "s3cret")
    assert main(["check", str(BUNDLED_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "RateLimitMiddleware" in out
    assert "POST /api/send-email" in out
    assert "5/hour per user" in out
    assert "s3cret" not in out


def test_check_fails_with_the_entry_at_fault(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "armor.toml"
    broken.write_text(
        '[[rate_limit]]\nroute = "* /api/*"\nrate = "1000/minute"\n\n'
        '[[rate_limit]]\nroute = "* /x"\nrate = "1/s"\n\n'
        '[[rate_limit]]\nroute = "POST /api/send-email"\nrate = "10/minuet"\n'
    )
    assert main(["check", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert "rate_limit[2]" in err
    assert "'10/minuet' is not a rate" in err


def test_check_fails_closed_without_webhook_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ARMOR_DEMO_WEBHOOK_SECRET", raising=False)
    assert main(["check", str(BUNDLED_CONFIG)]) == 1
    assert "ARMOR_DEMO_WEBHOOK_SECRET" in capsys.readouterr().err


def test_run_rejects_bad_app_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "armor.toml"
    config.write_text("")
    assert main(["run", "no-colon", "--config", str(config)]) == 1
    assert "module:attribute" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:notaport/14",
        "redis://127.0.0.1/notadb",
        "mongodb://127.0.0.1/0",
        "redis://:hunter2@127.0.0.1:6379/0?decode_responses=yes",
    ],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_malformed_store_url_is_one_line_naming_store(
    url: str,
    command: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        pytest.fail("served despite a malformed store URL")

    monkeypatch.setattr("asgi_armor.cli._serve", never)
    config = tmp_path / "armor.toml"
    config.write_text(f'store = "{url}"\n')
    argv = ["check", str(config)]
    if command == "run":
        argv = ["run", "tests.integration.sample_app:app", "--config", str(config)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("asgi-armor: configuration error: store: ")
    assert "Traceback" not in captured.out + captured.err
    assert "hunter2" not in captured.err
