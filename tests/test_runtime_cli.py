"""`edgelearn device` / `learn` budget options: profiles, overrides, 'off', and clear errors."""

import pytest

from cli import _budget, build_parser, main
from edge_runtime.budget import PROFILES

BASE = ["device", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--id", "d", "--state", "/tmp/unused"]


def test_profile_values_with_user_overrides_on_top():
    b = _budget(build_parser().parse_args([*BASE, "--budget-profile", "pi", "--max-temp-c", "off", "--threads", "2"]))
    assert b.max_temperature_c is None and b.threads == 2
    assert b.max_cpu_percent == PROFILES["pi"].max_cpu_percent and b.max_rss_mb == PROFILES["pi"].max_rss_mb


def test_no_options_give_the_default_profile():
    assert _budget(build_parser().parse_args(BASE)) == PROFILES["default"]


def test_bad_limit_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*BASE, "--max-cpu", "lots"])
    assert e.value.code == 2 and "expected a number or 'off', got 'lots'" in capsys.readouterr().err


def test_learn_with_a_missing_bundle_says_so(tmp_path, capsys):
    code = main(["learn", "--bundle", str(tmp_path / "nope"), "--state", str(tmp_path / "s"), "--steps", "1"])
    assert code == 2 and "edgelearn learn: error:" in capsys.readouterr().err


def test_async_options_reach_the_device_config():
    from cli.device_cmd import _device_config
    from edge_runtime.budget import Budget
    from edgelearn.protocol import LocalConfig

    a = build_parser().parse_args([*BASE, "--async-interval", "2.5", "--local-steps", "7", "--local-batch-size", "4",
                                   "--local-lr", "0.1"])  # fmt: skip
    cfg = _device_config(a, Budget(), None)
    assert cfg.async_interval_s == 2.5 and cfg.async_local == LocalConfig(7, 4, 0.1)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--local-steps", "0", "must be >= 1"), ("--local-lr", "nan", "must be > 0.0"),
     ("--async-interval", "soon", "expected a number")],
)  # fmt: skip
def test_bad_async_option_is_a_one_line_usage_error(capsys, option, value, message):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*BASE, option, value])
    assert e.value.code == 2 and f"argument {option}: {message}" in capsys.readouterr().err
