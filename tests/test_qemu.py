"""arm64 under QEMU: the pure parts (fake CPU description, unit parsing) always; the rehearsal with `-m qemu`."""

import json
import os
import shutil
import time

import pytest

from devices.flash import DeviceSettings, env_text, unit_text
from devices.profiles import ProfileError, load_profile
from devices.qemu.fakecpu import CPUS, cpuinfo_text, midr_el1, sys_files, write_fake_cpu
from devices.qemu.guest import active_versions, exec_start_argv, read_env_file


def test_midr_el1_matches_the_kernel_values_of_the_boards():
    # Prepare / Execute / Assert: Cortex-A72 r0p3 (Pi 4) and Cortex-A76 r4p1 (Pi 5) as Linux prints them
    assert midr_el1(CPUS["rpi4"]) == 0x410FD083
    assert midr_el1(CPUS["rpi5"]) == 0x414FD0B1


def test_fake_cpu_tree_describes_every_core_and_cache(tmp_path):
    # Prepare / Execute
    cpu = write_fake_cpu(tmp_path, "rpi4")
    base = tmp_path / "sys/devices/system/cpu"
    # Assert: core list, MIDR per core, L2 shared by all four, sets = size / (ways · line)
    assert (base / "possible").read_text() == "0-3\n"
    assert (base / "cpu3/regs/identification/midr_el1").read_text() == "0x00000000410fd083\n"
    assert (base / "cpu2/cache/index2/shared_cpu_list").read_text() == "0-3\n"
    assert (base / "cpu2/cache/index0/shared_cpu_list").read_text() == "2\n"
    assert (base / "cpu0/cache/index2/number_of_sets").read_text() == str(1024 * 1024 // (16 * 64)) + "\n"
    info = (tmp_path / "cpuinfo").read_text()
    assert info.count("CPU part\t: 0xd08") == cpu.cores == 4
    assert len(sys_files(CPUS["rpi5"])) > len(sys_files(cpu))  # the Pi 5 has one more cache level
    assert cpuinfo_text(cpu) == info


def test_fake_cpu_rejects_an_unknown_board(tmp_path):
    with pytest.raises(ValueError, match="no arm64 CPU description for board 'x86-dev'"):
        write_fake_cpu(tmp_path, "x86-dev")


def test_exec_start_of_the_flashed_unit_becomes_the_agent_argv(tmp_path):
    # Prepare: the unit and env file exactly as `edgelearn flash` writes them
    s = DeviceSettings("pi-7", "lab", "mqtt://127.0.0.1:1883")
    (tmp_path / "device.env").write_text("# written by flash\n" + env_text(s))
    # Execute
    env = read_env_file(tmp_path / "device.env")
    argv = exec_start_argv(unit_text(s), env)
    # Assert: the broker URL (it may hold a password) comes from the environment, not the command line
    assert argv[:2] == ["/opt/edgelearn/venv/bin/edgelearn", "device"]
    pairs = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert "--broker" not in pairs and env["EDGELEARN_BROKER"] == "mqtt://127.0.0.1:1883"
    assert pairs["--id"] == "pi-7"
    assert pairs["--fleet"] == "lab"
    assert pairs["--data"] == "/var/lib/edgelearn/data.safetensors"
    assert pairs["--bundle"] == "/opt/edgelearn/current/bundle"


def test_exec_start_names_a_variable_the_env_file_lacks():
    s = DeviceSettings("pi-7", "lab", "mqtt://127.0.0.1:1883")
    with pytest.raises(ValueError, match=r"\$\{EDGELEARN_DATA\}"):
        exec_start_argv(unit_text(s), {"EDGELEARN_BROKER": "x", "EDGELEARN_FLEET": "f", "EDGELEARN_DEVICE_ID": "d"})


def test_active_versions_reads_the_agent_state(tmp_path):
    assert active_versions(tmp_path) == (0, 0)
    (tmp_path / "active.json").write_text(json.dumps({"version": 2, "previous": 1}))
    assert active_versions(tmp_path) == (2, 1)


def test_the_flashed_profile_file_alone_is_a_complete_profile(tmp_path):
    # Prepare: profile.toml as flash writes it; the unit passes it as --profile-file without --profile
    f = tmp_path / "profile.toml"
    f.write_text(load_profile("rpi4").to_toml())
    partial = tmp_path / "partial.toml"
    partial.write_text("[budget]\nthreads = 2\n")
    # Execute / Assert (found by the arm64 rehearsal: the flashed agent crashed on start)
    assert load_profile("", f) == load_profile("rpi4")
    with pytest.raises(ProfileError, match="missing field"):
        load_profile("", partial)


@pytest.mark.qemu
def test_flashed_agent_takes_part_in_a_round_as_arm64_code(bundle_dir):
    """`make qemu-test`: root, debootstrap, qemu-user-static; minutes from the cache, ~10+ from scratch."""
    from devices.qemu.harness import DEFAULT_CACHE, QemuConfig, rehearse

    # Prepare
    assert os.geteuid() == 0, "the qemu rehearsal needs root (debootstrap, chroot, mounts)"
    work = DEFAULT_CACHE / "runs" / time.strftime("%Y%m%d-%H%M%S")  # kept for its logs (not the shared /tmp)
    cfg = QemuConfig(work_dir=work, bundle_dir=bundle_dir)
    # Execute
    doc = rehearse(cfg, work / "qemu-timings.json")
    shutil.copyfile(work / "qemu-timings.json", DEFAULT_CACHE / "last-qemu-timings.json")
    print(json.dumps(doc, indent=2))
    # Assert: really aarch64, one update for round 1 accepted, release 2 published and active on the device
    assert all(s["ok"] for s in doc["steps"]), doc["steps"]
    assert doc["guest"]["machine"] == "aarch64"
    assert doc["guest"]["torch"].startswith("2.13.0")
    assert doc["guest"]["max_abs_logit_diff"] < 1e-4  # the same .pte gives the host's outputs under emulation
    r = doc["round"]
    assert (r["update_round"], r["ack_status"], r["latest_version"]) == (1, "accepted", 2)
    assert (r["active_version"], r["previous_version"]) == (2, 1)
    assert r["update_samples"] > 0
    assert doc["leftover_mounts"] == []
