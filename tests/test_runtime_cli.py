"""`edgelearn device` / `learn` budget options: profiles, overrides, 'off', and clear errors."""

import pytest

from cli import _budget, build_parser, main
from devices.profiles import load_profile

BASE = ["device", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--id", "d", "--state", "/tmp/unused"]


def test_profile_values_with_user_overrides_on_top():
    b = _budget(build_parser().parse_args([*BASE, "--profile", "pi", "--max-temp-c", "off", "--threads", "2"]))
    pi = load_profile("pi").budget
    assert b.max_temperature_c is None and b.threads == 2
    assert b.max_cpu_percent == pi.max_cpu_percent == 70.0 and b.max_rss_mb == pi.max_rss_mb == 500.0


def test_no_options_give_the_default_profile():
    assert _budget(build_parser().parse_args(BASE)) == load_profile("default").budget


def test_the_former_budget_profile_option_names_its_replacement(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*BASE, "--budget-profile", "pi"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--budget-profile was replaced by --profile pi" in err


def test_bad_limit_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*BASE, "--max-cpu", "lots"])
    assert e.value.code == 2 and "expected a number or 'off', got 'lots'" in capsys.readouterr().err


def test_learn_with_a_missing_bundle_says_so(tmp_path, capsys):
    code = main(["learn", "--bundle", str(tmp_path / "nope"), "--state", str(tmp_path / "s"), "--steps", "1"])
    assert code == 2 and "edgelearn learn: error:" in capsys.readouterr().err


def test_async_options_reach_the_device_config():
    from cli.device_cmd import _device_config
    from edgelearn.protocol import LocalConfig

    a = build_parser().parse_args([*BASE, "--async-interval", "2.5", "--local-steps", "7", "--local-batch-size", "4",
                                   "--local-lr", "0.1"])  # fmt: skip
    cfg = _device_config(a, load_profile("default"))
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


def test_profile_settings_reach_the_device_config(tmp_path):
    from cli.device_cmd import _device_config

    f = tmp_path / "p.toml"
    f.write_text('base = "rpi4"\n[mqtt]\nkeepalive_s = 7\n[outbox]\nmax_items = 9\nack_timeout_s = 4.5\n')
    cfg = _device_config(build_parser().parse_args([*BASE, "--profile-file", str(f)]), load_profile("", f))
    assert (cfg.keepalive_s, cfg.max_outbox, cfg.ack_timeout_s) == (7, 9, 4.5)
    assert cfg.budget == load_profile("rpi4").budget
    a = build_parser().parse_args([*BASE, "--profile-file", str(f), "--ack-timeout", "12"])
    assert _device_config(a, load_profile("", f)).ack_timeout_s == 12.0  # an option given wins over the profile


def _connect_keepalive(packet: bytes) -> int:
    """The keep-alive of an MQTT CONNECT packet: fixed header (0x10, varint length), protocol name (2-byte
    length + 'MQTT'), level, flags, then the keep-alive as a big-endian 16-bit count of seconds."""
    assert packet[0] == 0x10, f"not a CONNECT packet: {packet[:8]!r}"
    i = 1
    while packet[i] & 0x80:  # remaining-length varint
        i += 1
    i += 1
    name_len = int.from_bytes(packet[i : i + 2], "big")
    i += 2 + name_len + 2  # name, level, flags
    return int.from_bytes(packet[i : i + 2], "big")


def test_profile_keepalive_is_on_the_wire(tmp_path):
    """A profile's [mqtt] keepalive_s reaches the device's CONNECT packet (it used to stay at 30 s)."""
    import socket

    from cli.device_cmd import _device_config
    from edge_runtime.agent import DeviceAgent

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    f = tmp_path / "p.toml"
    f.write_text('base = "rpi4"\n[mqtt]\nkeepalive_s = 7\n')
    args = [*BASE[:2], f"mqtt://127.0.0.1:{port}", *BASE[3:7], "--state", str(tmp_path / "s"), "--profile-file", str(f)]
    a = build_parser().parse_args(args)
    agent = DeviceAgent(_device_config(a, load_profile("", f)))
    try:
        agent.link.start(wait_s=0)
        server.settimeout(10)
        conn, _ = server.accept()
        conn.settimeout(10)
        packet = conn.recv(4096)
        conn.close()
    finally:
        agent.link.stop()
        server.close()
    assert _connect_keepalive(packet) == 7
