"""`edgelearn broker config`: mosquitto limits sized from the fleet and the model (edgelearn/broker.py)."""

import pytest

from cli import main
from edgelearn.broker import MIB, BrokerSizing, mosquitto_config, size_broker

pytestmark = pytest.mark.slow  # real processes, brokers or exports: minutes in all (make test-fast skips)


def test_sizing_from_fleet_and_model():
    # 5000 devices, 4 MB model: queue 8·5000 = 40000; packet = 16 MB release + 1 MiB, rounded up to MiB
    s = size_broker(5000, 4_000_000)
    assert s.max_queued_messages == 40_000
    assert s.max_packet_bytes == 17 * MIB and s.max_packet_bytes >= 16_000_000 + MIB
    assert size_broker(10, 1000).max_queued_messages == 10_000  # never below 10k (the default 1000 drops)


def test_packets_of_256_mib_or_more_are_refused():
    with pytest.raises(ValueError, match="256 MiB"):
        size_broker(10, 100 * MIB)  # release 400 MiB
    with pytest.raises(ValueError, match="256 MiB"):
        mosquitto_config(1883, "/tmp", BrokerSizing(10_000, 256 * MIB, MIB))


def test_cli_writes_the_config(tmp_path, capsys):
    out = tmp_path / "mosquitto.conf"
    assert main(["broker", "config", "--devices", "5000", "--model-bytes", "4000000", "--out", str(out)]) == 0
    text = out.read_text()
    assert "max_queued_messages 40000" in text and f"max_packet_size {17 * MIB}" in text
    assert "persistence true" in text and "listener 1883 127.0.0.1" in text
    assert main(["broker", "config", "--devices", "1", "--model-bytes", str(300 * MIB)]) == 2
    assert "256 MiB" in capsys.readouterr().err


def test_a_listener_off_loopback_needs_mutual_tls_or_a_password_file(tmp_path, capsys):
    # Execute: anonymous on 0.0.0.0 (refused), then with a password file and an ACL
    refused = main(["broker", "config", "--devices", "10", "--model-bytes", "1000", "--bind", "0.0.0.0"])
    err = capsys.readouterr().err
    out = tmp_path / "m.conf"
    auth = ["--password-file", "/etc/mosquitto/passwd", "--acl-file", "/etc/mosquitto/acl"]
    ok = main(
        ["broker", "config", "--devices", "10", "--model-bytes", "1000", "--bind", "0.0.0.0", *auth, "--out", str(out)]
    )
    text = out.read_text()
    # Assert
    assert refused == 2 and "mutual TLS) or --password-file" in err and "\n" not in err.strip()
    assert ok == 0 and "allow_anonymous false" in text and "password_file /etc/mosquitto/passwd" in text
    assert "acl_file /etc/mosquitto/acl" in text and "allow_anonymous true" not in text
    assert "max_queued_bytes 0" not in text  # an offline coordinator's backlog is bounded
